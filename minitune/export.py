"""`minitune export x.yaml`: fold a trained LoRA / AdaLoRA adapter into its base model and write an
ordinary Hugging Face checkpoint, as `llamafactory-cli export` does (seed 000: merge the LoRA weights
into the base for inference).

    W = W0 + s * B A        for every adapted layer (LoRALinear.merge, SVDLinear.merge)

The merged folder loads in transformers (or `minitune.load_pretrained`) with no adapter code and gives
the adapted model's outputs. Whole modules trained beside LoRA (PEFT's modules_to_save, LLaMA-Factory's
`additional_target`) come in with the adapter and replace the base's (peft/modules_to_save.py); a tied
head trained that way is written as its own matrix (tie_word_embeddings false). A QLoRA adapter is
merged into the full-precision base, not the 4-bit one: the 4-bit weights were only ever a frozen copy of
it. Soft prompts and bottleneck adapters add computation rather than a weight delta, so there is nothing
to fold: they are refused.

Keys (LLaMA-Factory's names): model_name_or_path, adapter_name_or_path, export_dir, export_size (GB per
safetensors shard, default 5), export_device (cpu | auto), export_legacy_format (false only: minitune
writes safetensors, never pickles).
"""

from pathlib import Path

import torch

import minitune

from .errors import UserError
from .finetuning import merge_and_unload
from .peft import LoRALinear, SVDLinear, load_adapter

EXPORT_KEYS = {"model_name_or_path": "model", "adapter_name_or_path": "adapter", "export_dir": "export_dir",
               "export_size": "export_size", "export_device": "export_device",
               "export_legacy_format": "export_legacy_format"}
EXPORT_NOTED = {"template": "the tokenizer files are copied as they are", "finetuning_type": "read from the adapter",
                "trust_remote_code": "minitune runs no code from a model folder"}


def export(model_dir, adapter_dir, export_dir, export_size: float = 5, export_device: str = "cpu",
           export_legacy_format: bool = False) -> Path:
    """Merge `adapter_dir` (if any) into the model in `model_dir` and write it to `export_dir`."""
    out = Path(export_dir)
    if export_legacy_format:
        raise UserError("export_legacy_format: true asks for pickled .bin files; minitune writes safetensors "
                        "only (expected false)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export_dir {out}: not empty; choose a new folder (an export never overwrites)")
    if export_size <= 0:
        raise UserError(f"export_size: {export_size} (expected a positive size in GB per shard)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if export_device == "auto" else export_device
    model, tok = minitune.load_pretrained(model_dir, device=device)  # in the checkpoint's own dtype
    if adapter_dir:
        try:
            model = load_adapter(model, adapter_dir)
        except (ValueError, FileNotFoundError) as e:  # AdapterError is a ValueError
            raise UserError(f"adapter_name_or_path {adapter_dir}: {e}") from None
        if not any(isinstance(m, (LoRALinear, SVDLinear)) for m in model.modules()):
            raise UserError(f"adapter_name_or_path {adapter_dir}: not a LoRA / AdaLoRA adapter; only a weight "
                            "delta can be merged into the base")
        model = merge_and_unload(model)
    minitune.save_pretrained(model.cpu(), tok, out, max_shard_size=int(export_size * 10**9))
    return out
