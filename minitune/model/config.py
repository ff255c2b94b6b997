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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

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


class ConfigError(UserError):
    """A config.json that minitune cannot turn into a model; the message names file and field."""


# ----------------------------------------------------------------------------- field types
# config.json is hand-edited and machine-written by many tools; a value of the wrong type
# ("hidden_size": "192", "tie_word_embeddings": "false") would otherwise surface as an obscure
# error deep inside torch, or worse, quietly build another model ("false" is truthy).


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is a Python int too


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_dtype_name(v) -> bool:
    dtype = getattr(torch, v.replace("torch.", ""), None) if isinstance(v, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _is_token_ids(v) -> bool:
    return v is None or _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v))


# expected (as the error message says it) -> the test
EXPECTED = {
    "a positive integer": lambda v: _is_int(v) and v > 0,
    "a positive integer or null": lambda v: v is None or (_is_int(v) and v > 0),
    "a positive number": lambda v: _is_number(v) and v > 0,
    "true or false": lambda v: isinstance(v, bool),
    "an object or null": lambda v: v is None or isinstance(v, dict),
    "a list of strings or null": lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
    "a floating-point dtype name such as \"bfloat16\", \"float16\" or \"float32\", or null":
        lambda v: v is None or _is_dtype_name(v),
    "a token id, a list of token ids, or null": _is_token_ids,
    "a token id or null": lambda v: v is None or _is_int(v),
}
FIELD_TYPES = {
    **{name: "a positive integer" for name in REQUIRED_FIELDS},
    "max_position_embeddings": "a positive integer",
    "num_key_value_heads": "a positive integer or null",
    "head_dim": "a positive integer or null",
    "rms_norm_eps": "a positive number",
    "rope_theta": "a positive number",
    "rope_scaling": "an object or null",
    "rope_parameters": "an object or null",
    "tie_word_embeddings": "true or false",
    "attention_bias": "true or false",
    "mlp_bias": "true or false",
    "use_sliding_window": "true or false",
    "architectures": "a list of strings or null",
    "torch_dtype": "a floating-point dtype name such as \"bfloat16\", \"float16\" or \"float32\", or null",
    "dtype": "a floating-point dtype name such as \"bfloat16\", \"float16\" or \"float32\", or null",
    "bos_token_id": "a token id, a list of token ids, or null",
    "eos_token_id": "a token id, a list of token ids, or null",
    "pad_token_id": "a token id or null",
}
# inside rope_scaling / rope_parameters, for the rope types that read them (minitune.model.rope)
ROPE_FIELD_TYPES = {"rope_theta": "a positive number", "factor": "a positive number",
                    "low_freq_factor": "a positive number", "high_freq_factor": "a positive number",
                    "original_max_position_embeddings": "a positive integer"}
ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}

JSON_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
                   dict: "an object", type(None): "null"}


def check_field(source: str, name: str, value, expected: str):
    """ConfigError naming the file, the field, its value and what it must be, unless it is that."""
    if not EXPECTED[expected](value):
        what = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise ConfigError(f"{source}: field {name!r} is {json.dumps(value)}, {what} (expected {expected})")


def check_field_types(d: dict, source: str):
    """Every field minitune reads from config.json, checked against FIELD_TYPES (fields it does not
    read are kept as they are, unchecked, and written back on save)."""
    for name, expected in FIELD_TYPES.items():
        if name in d:
            check_field(source, name, d[name], expected)


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
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: holds {JSON_TYPE_NAMES.get(type(d), type(d).__name__)} "
                              "(expected a JSON object of model fields)")
        check_field_types(d, source)
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
        heads, kv_heads = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads} (each key/value head serves the same number of query heads)")
        if d.get("head_dim") is None and model_type != "qwen3" and d["hidden_size"] % heads:
            raise ConfigError(f"{source}: hidden_size {d['hidden_size']} is not a multiple of num_attention_heads "
                              f"{heads} (expected that, or an explicit head_dim)")

        # RoPE: transformers 5 nests theta inside rope_parameters; classic configs keep it top-level.
        rope_field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "rope_theta" in rope:
            check_field(source, f"{rope_field}.rope_theta", rope["rope_theta"], ROPE_FIELD_TYPES["rope_theta"])
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))  # a top-level one is checked above
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope_type {rope_type!r} not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        for name in ROPE_REQUIRED.get(rope_type, ()):
            if name not in rope:
                raise ConfigError(f"{source}: {rope_field} of rope_type {rope_type!r} has no {name!r} "
                                  f"(expected {ROPE_FIELD_TYPES[name]})")
        if rope_type != "default":  # the default rope reads nothing else
            for name, expected in ROPE_FIELD_TYPES.items():
                if name in rope:
                    check_field(source, f"{rope_field}.{name}", rope[name], expected)
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
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found (is this a Hugging Face checkpoint folder?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}; JSON files are UTF-8)") from None
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
