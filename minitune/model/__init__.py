"""The decoder-only transformer and its checkpoints (lesson 02)."""

from .checkpoint import CheckpointError, load_model, save_pretrained
from .config import ConfigError, ModelConfig
from .kv_cache import KVCache
from .static_cache import StaticKVCache
from .transformer import Transformer

__all__ = ["CheckpointError", "ConfigError", "KVCache", "ModelConfig", "StaticKVCache", "Transformer", "load_model",
           "save_pretrained"]
