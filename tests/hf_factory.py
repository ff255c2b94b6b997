"""Tiny Hugging Face checkpoints written by `transformers` itself, for parity tests.

Random weights, with every RMSNorm weight and bias perturbed away from its init so that a norm
applied in the wrong place, or a missing bias, changes the logits.
"""

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=4096)

KINDS = {
    # Qwen2: q/k/v bias, tied embeddings, grouped-query attention (4 query heads share 2 kv heads)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen3: QK-norm, head_dim set explicitly (32, not hidden/heads = 16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # LLaMA-2: plain multi-head attention, untied head
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    # LLaMA-3.1/3.2: GQA, theta 500000 and llama3 rope scaling
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


def hf_model(kind: str, seed: int = 0, **overrides):
    import transformers

    cfg_name, model_name, extra = KINDS[kind]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def to_classic_form(path: Path):
    """Rewrite a transformers-5 config.json (rope_parameters, dtype) into the classic form
    (top-level rope_theta, rope_scaling, torch_dtype) that most checkpoints on the hub still ship."""
    cfg_file = Path(path) / "config.json"
    d = json.loads(cfg_file.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = rope
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    cfg_file.write_text(json.dumps(d, indent=2))


def write_checkpoint(kind: str, path, dtype=torch.float32, sharded=False, classic=False, seed=0):
    """Save a tiny `kind` checkpoint to path; returns the transformers model (in `dtype`)."""
    model = hf_model(kind, seed).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "5GB")
    if classic:
        to_classic_form(path)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the issue's tolerances are stated in."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def write_checkpoints(tmp_path_factory, kinds) -> dict:
    """kind -> a folder holding that kind's checkpoint; for module-scoped fixtures, since writing
    the checkpoints is the slow part of a parity test module."""
    paths = {}
    for kind in kinds:
        paths[kind] = tmp_path_factory.mktemp(kind)
        write_checkpoint(kind, paths[kind])
    return paths


def hf_load(path):
    """transformers' own model of a checkpoint folder, in eval mode: the oracle side of a parity test."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def full_forward_greedy(model, ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                        positions_from_mask: bool = False) -> torch.Tensor:
    """Greedy decoding by a full forward pass over the whole sequence at every step (no cache).

    The oracle for PEFT's prompt-learning models: their `generate` path (cache handling, position
    numbering) changes between releases, while what their forward computes has stayed put.
    positions_from_mask: number each row's positions from its first real token, padding taking none,
    as `generate` does with a left-padded batch (PEFT's prefix model then adds its N virtual
    positions itself); False leaves the positions to the model's forward."""
    seq = ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        for _ in range(max_new_tokens):
            extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions_from_mask else {}
            nxt = model(input_ids=seq, attention_mask=mask, **extra).logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], dim=1), torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return seq
