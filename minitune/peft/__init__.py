"""Parameter-efficient fine-tuning by hand: one method per file (lessons 06-09).

    targets.py         the floor: which linear layers, replace_module, count_parameters
    adapter_files.py   PEFT's adapter folder format;  trainable_tokens.py  trained embedding rows
    modules_to_save.py whole modules trained beside LoRA (PEFT's modules_to_save, LLaMA-Factory's additional_target)
    lora.py (+ lora_backward.py)  qlora.py (LoRA over a 4-bit base)  adalora.py  adapter.py  prefix.py  prompt.py
    adapter_io.py      save_adapter / load_adapter for every method, dispatching on the folder
"""

from .adapter_files import AdapterError
from .adapter_io import load_adapter
from .adapter_io import save_adapter
from .targets import count_parameters
from .targets import linear_names
from .targets import match_targets
from .targets import replace_module
from .targets import target_modules_for_config
from .lora import LoRALinear
from .lora import apply_lora
from .lora import lora_state_dict
from .lora import merge_lora
from .lora import print_trainable_parameters
from .lora import unmerge_lora
from .lora import disable_lora
from .qlora import QLoRALinear
from .qlora import load_qlora
from .qlora import merge_and_dequantize
from .adalora import AdaLoRAConfig
from .adalora import AdaLoRAController
from .adalora import SVDLinear
from .adalora import apply_adalora
from .adalora import orth_regularizer
from .adapter import Adapter
from .adapter import adapter_num_params
from .adapter import adapter_state_dict
from .adapter import apply_adapters
from .adapter import remove_adapters
from .prefix import PrefixEncoder
from .prefix import PrefixTuningModel
from .prefix import prefix_tuning_num_params
from .prompt import PTuningModel
from .prompt import PromptEmbedding
from .prompt import PromptEncoder
from .prompt import PromptTuningModel
from .prompt import p_tuning_num_params
from .prompt import prompt_tuning_num_params
from .trainable_tokens import TrainableTokensEmbedding
from .trainable_tokens import TrainableTokensHead
from .trainable_tokens import apply_trainable_tokens
from .trainable_tokens import token_ids
from .trainable_tokens import trainable_tokens_num_params
from .trainable_tokens import unload_trainable_tokens
from .modules_to_save import apply_modules_to_save
from .modules_to_save import modules_to_save_num_params
