"""minitune/peft's layout (issue 18): targets.py is the floor every method file stands on, no method
file imports another (but QLoRA, which is LoRA over a 4-bit base), no function-level imports, one
parameter counter, and one save_adapter / load_adapter for every method."""

import ast
from pathlib import Path

import pytest
import torch

import minitune.memory
import minitune.peft as P
from minitune.peft import AdapterError, adapter_io, targets
from minitune.peft.adapter_files import write_adapter_dir
from minitune.quant import Linear4bit

PEFT = Path(P.__file__).parent
METHODS = {"lora", "lora_backward", "qlora", "adalora", "adapter", "prefix", "prompt"}


def _imports(path: Path):
    """(module-level `from .x` names, function-level import statements) of one file."""
    tree = ast.parse(path.read_text())
    top = {a.name if n.module is None else n.module.split(".")[0]
           for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
    inner = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return top, inner


@pytest.mark.parametrize("path", sorted(PEFT.glob("*.py")), ids=lambda p: p.name)
def test_no_function_level_imports_and_no_method_imports_another(path):
    top, inner = _imports(path)
    assert not inner, f"{path.name}: imports inside functions at lines {[n.lineno for n in inner]}"
    if path.stem in METHODS:
        allowed = {"lora", "lora_backward"} if path.stem == "qlora" else {"lora_backward"} if path.stem == "lora" else set()
        assert not (top & METHODS) - allowed, f"{path.stem} imports {sorted(top & METHODS)}"
    if path.stem == "targets":
        assert top <= {"adapter_files"}


def test_one_public_counter():
    assert P.count_parameters is targets.count_parameters is P.lora.count_parameters
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert P.count_parameters(model) == (8, 23)
    # memory.count_parameters is another thing: the count a ModelConfig implies, with no model built
    assert minitune.memory.count_parameters is not P.count_parameters


def test_adapter_io_dispatches_on_the_folder(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no LoRA layers"):
        P.save_adapter(model, tmp_path / "none")
    with pytest.raises(ValueError, match="not one of"):
        P.save_adapter(model, tmp_path / "none", method="bitfit", settings={})
    write_adapter_dir(tmp_path / "ia3", {"peft_type": "IA3"}, {"base_model.model.0.ia3_l": torch.ones(4)})
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not a LoRA adapter"):
        P.load_adapter(model, tmp_path / "ia3")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / adapter_io.METHOD_FILE).write_text('{"finetuning_type": "bitfit"}')
    with pytest.raises(AdapterError, match="finetuning_type 'bitfit' is not one of"):
        P.load_adapter(model, tmp_path / "m")


def test_qlora_layer_is_lora_over_a_4bit_base():
    assert issubclass(P.QLoRALinear, P.LoRALinear) and P.lora.LAYER_FOR_BASE[Linear4bit] is P.QLoRALinear
