"""minitune: LLM post-training written from scratch in readable PyTorch.

    model, tok = minitune.load_pretrained("weights/tiny")
    ids = torch.tensor([tok.encode("Who are you?")])
    out = minitune.generate(model, ids, max_new_tokens=32, eos_id=tok.eos_id)
    print(tok.decode(out[0, ids.shape[1]:].tolist()))

The loaders, each one step on top of the one before (one name, one job):

    minitune.model.load_model(path)          config.json + safetensors -> Transformer (model/checkpoint.py)
    minitune.load_pretrained(path)           ... + the tokenizer: (model, tok)       (this file)
    minitune.cli.load_for_training(cfg)      ... + the finetuning_type's method on it (LoRA, prompts, ...)
    minitune.chat.load_for_inference(args)   ... + an adapter folder read back, on the chosen device
    classroom.tiny_sft.load_lesson_model     what lessons 06-08 load: fp32 for training, their thread rule
"""

from pathlib import Path

from .generation import generate
from .model import ModelConfig, Transformer, load_model, save_pretrained
from .tokenizer import load_tokenizer


def load_pretrained(path, device="cpu", dtype=None, quantize=None):
    """(model, tokenizer) from a Hugging Face checkpoint folder; dtype=None keeps the checkpoint's.

    quantize="nf4" loads the linear layers straight into NF4 (QLoRA). The tokenizer is None when
    the folder has no tokenizer files.
    """
    model = load_model(path, device=device, dtype=dtype, quantize=quantize)
    has_tokenizer = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    return model, (load_tokenizer(path) if has_tokenizer else None)


__all__ = ["ModelConfig", "Transformer", "generate", "load_model", "load_pretrained", "load_tokenizer", "save_pretrained"]
