"""The model config: every number that decides the shape of a decoder-only transformer.

Hugging Face checkpoints describe their model in `config.json`. Real checkpoints ship it in two
forms, and we read both:

* classic (transformers 4.x): top-level `rope_theta`, optional `rope_scaling`
  (e.g. `{"rope_type": "llama3", "factor": 8.0, ...}`), and `torch_dtype`;
* transformers 5: `rope_parameters` (`{"rope_type": ..., "rope_theta": ..., ...}`) and `dtype`.

The three families differ only in small switches, which is the point of lesson 02:

    family   architectures        q/k/v bias   o bias   QK-norm   head_dim default
    LLaMA    LlamaForCausalLM     attention_bias         no        hidden / heads
    Qwen2    Qwen2ForCausalLM     always       no        no        hidden / heads
    Qwen3    Qwen3ForCausalLM     attention_bias         yes       128
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# architectures value -> model_type. Anything else is refused with this list in the message.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _dtype_name(value) -> str | None:
    return str(value).replace("torch.", "") if value else None


class ConfigError(ValueError):
    """A config.json that minitune cannot turn into a model; the message names file and field."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # fewer than heads = grouped-query attention (GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # None: the family's rule (table above)
    o_bias: bool | None = None
    mlp_bias: bool = False
    qk_norm: bool | None = None
    torch_dtype: str | None = None  # the checkpoint's storage dtype, e.g. "bfloat16"
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # fields we don't use, written back on save

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(f"model_type {self.model_type!r} not supported; expected one of "
                              f"{sorted(SUPPORTED_ARCHITECTURES.values())}")
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2"
        if self.o_bias is None:
            self.o_bias = False
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        if self.model_type == "qwen2" and not (self.qkv_bias and not self.o_bias):
            raise ConfigError("qwen2 always has q/k/v bias and no o_proj bias (config.json cannot say otherwise)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def architecture(self) -> str:
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(torch, self.torch_dtype) if self.torch_dtype else None

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read either config form; `source` names the file in error messages."""
        archs = d.get("architectures") or []
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if archs and not known:
            raise ConfigError(f"{source}: architectures {archs} not supported; "
                              f"minitune supports {sorted(SUPPORTED_ARCHITECTURES)}")
        model_type = SUPPORTED_ARCHITECTURES[known[0]] if known else d.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(f"{source}: model_type {model_type!r} not supported; minitune supports "
                              f"{sorted(SUPPORTED_ARCHITECTURES)} (model types {sorted(SUPPORTED_ARCHITECTURES.values())})")
        for name in REQUIRED_FIELDS:
            if name not in d:
                raise ConfigError(f"{source}: required field {name!r} is missing")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (full attention only)")

        # RoPE: transformers 5 nests theta inside rope_parameters; classic configs keep it top-level.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope_type {rope_type!r} not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}

        attention_bias = bool(d.get("attention_bias", False))
        used = set(REQUIRED_FIELDS) | {
            "architectures", "model_type", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"}
        return cls(
            **{k: d[k] for k in REQUIRED_FIELDS},
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim") or (128 if model_type == "qwen3" else None),
            model_type=model_type,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=None if model_type == "qwen2" else attention_bias,
            o_bias=None if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            torch_dtype=_dtype_name(d.get("dtype") or d.get("torch_dtype")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in used},
        )

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found (is this a Hugging Face checkpoint folder?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """The classic config.json form, which transformers 4.x and 5 both read."""
        d = {k: v for k, v in asdict(self).items()
             if k not in ("extra", "qkv_bias", "o_bias", "qk_norm", "rope_scaling")}
        d.update(self.extra)
        d["architectures"] = [self.architecture]
        d["hidden_act"] = "silu"
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d
