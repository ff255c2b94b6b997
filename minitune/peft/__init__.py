"""Parameter-efficient fine-tuning by hand: one method per file (lessons 06-08)."""

from .lora import AdapterError
from .lora import LoRALinear
from .lora import apply_lora
from .lora import count_parameters
from .lora import load_adapter
from .lora import lora_state_dict
from .lora import merge_lora
from .lora import print_trainable_parameters
from .lora import save_adapter
from .lora import unmerge_lora
