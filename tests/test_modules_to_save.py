"""Whole modules trained beside LoRA (minitune/peft/modules_to_save.py): PEFT's `modules_to_save`, LLaMA-Factory's
`additional_target`. Adapters move both ways with PEFT to the same logits (tied and untied heads), the file holds
PEFT's tensor names, `minitune train --additional_target` trains those weights and no other base weight, export
merges them, and bad names are one-line errors."""

import json

import pytest
import torch
from hf_factory import hf_load, rel_error, write_checkpoints
from safetensors.torch import load_file
from test_peft_training import base_name, run_cli_train, tiny_dir  # noqa: F401  (tiny_dir: a module fixture)

import minitune
from minitune.cli import main
from minitune.finetuning import apply_finetuning_type
from minitune.peft import AdapterError, apply_lora, apply_modules_to_save, load_adapter, save_adapter
from minitune.train import TrainConfig
from minitune.train.config import TrainConfigError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)
REL_TOL = 1e-5  # max |ours - PEFT| / max |PEFT| over the logits, fp32
IDS = torch.tensor([[5, 9, 7, 30, 300, 2, 41, 7, 5, 12]])
LORA = ["q_proj", "v_proj"]
# (checkpoint kind, modules_to_save): qwen2's head is tied to its embedding, llama2's is not; "norm" is PEFT's
# plain suffix rule at work (every RMSNorm: input_layernorm, post_attention_layernorm, model.norm)
CASES = [("qwen2", ["lm_head"]), ("qwen2", ["embed_tokens", "lm_head"]), ("llama2", ["embed_tokens", "lm_head"]),
         ("llama2", ["norm"])]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoints(tmp_path_factory, ["qwen2", "llama2"])


def perturb(named_params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(named_params, key=lambda x: x[0]):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def ours_trained(path, targets):
    model, _ = minitune.load_pretrained(path, dtype=torch.float32)
    apply_lora(model, 4, 8, targets=LORA)
    apply_modules_to_save(model, targets, lora_names=[n for n, m in model.named_modules() if hasattr(m, "lora_A")])
    perturb([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return model.eval()


@pytest.mark.parametrize("kind,targets", CASES)
def test_our_adapter_with_modules_to_save_loads_in_peft_with_same_logits(ckpt, kind, targets, tmp_path):
    ours = ours_trained(ckpt[kind], targets)
    save_adapter(ours, tmp_path / "a", str(ckpt[kind]))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == targets
    ref = peft.PeftModel.from_pretrained(hf_load(ckpt[kind]), tmp_path / "a").eval()
    with torch.no_grad():
        expected = ref(IDS).logits
        assert rel_error(ours(IDS), expected) < REL_TOL
        assert rel_error(minitune.load_pretrained(ckpt[kind])[0](IDS), expected) > 1e-3  # the adapter matters
    if kind == "qwen2":  # the head trains its own copy: the tie is gone, as in PEFT
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings


@pytest.mark.parametrize("kind,targets", CASES)
def test_peft_adapter_with_modules_to_save_loads_in_minitune_with_same_logits_and_layout(ckpt, kind, targets,
                                                                                         tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA, modules_to_save=targets)
    ref = peft.get_peft_model(hf_load(ckpt[kind]), cfg)
    perturb([(n, p) for n, p in ref.named_parameters() if p.requires_grad])
    ref.save_pretrained(tmp_path / "peft")
    ours = load_adapter(minitune.load_pretrained(ckpt[kind], dtype=torch.float32)[0], tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_error(ours(IDS), ref.eval()(IDS).logits) < REL_TOL
    # saved again by minitune: PEFT's tensor names and values, the same file
    save_adapter(ours, tmp_path / "ours", str(ckpt[kind]))
    theirs, mine = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert "base_model.model.lm_head.weight" in mine or targets == ["norm"]


def test_cli_additional_target_trains_the_head_keeps_other_base_weights_and_export_merges(tiny_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    start, model = run_cli_train(tiny_dir, tmp_path / "out", "lora", monkeypatch, "--additional_target", "lm_head")
    base, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)  # tied head
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)  # the head trained, whole
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trained and all("lora_" in n for n in trained - {"lm_head.weight"})
    base_sd = base.state_dict()
    for name, p in model.named_parameters():  # the embedding (tied to the head before) and the rest: untouched
        if name not in trained:
            assert torch.equal(p, base_sd[base_name(name)]), name
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.lm_head.weight"], model.lm_head.weight.detach())
    ids = torch.tensor([[3, 17, 40, 8, 99, 2]])
    with torch.no_grad():
        expected = model.eval()(ids)
        chat = load_adapter(minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)[0], tmp_path / "out")
        assert rel_error(chat.eval()(ids), expected) < REL_TOL  # what `minitune chat --adapter` reads
        main(["export", "--model", str(tiny_dir / "model"), "--adapter", str(tmp_path / "out"),
              "--export_dir", str(tmp_path / "merged")])
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
        merged = minitune.load_pretrained(tmp_path / "merged", dtype=torch.float32)[0]
        assert rel_error(merged(ids), expected) < REL_TOL
        assert rel_error(hf_load(tmp_path / "merged")(ids).logits, expected) < REL_TOL


@pytest.mark.parametrize("args,says", [
    (["--additional_target", "lm_head,nope"], "additional_target: 'nope' matches no module"),
    (["--additional_target", "q_proj"], "overlaps the LoRA layer"),
    (["--additional_target", "lm_head", "--finetuning_type", "full"], "finetuning_type lora or qlora, not full"),
    (["--additional_target", "lm_head", "--stage", "ppo"], "stage ppo: the reference is the actor"),
])
def test_bad_additional_target_is_a_one_line_error(tiny_dir, tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model_name_or_path", str(tiny_dir / "model"), "--dataset", str(tiny_dir / "data.json"),
              "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj", "--output_dir", str(tmp_path / "o"),
              "--max_steps", "1", "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and says in err and "\n" not in err, err


def test_qlora_trains_a_full_precision_head_and_refuses_a_4bit_module(tiny_dir):
    cfg = TrainConfig(finetuning_type="lora", quantization_bit=4, lora_target="q_proj", lora_rank=4,
                      additional_target="lm_head")
    model = minitune.load_model(tiny_dir / "model", dtype=torch.float32, quantize="nf4")
    model = apply_finetuning_type(model, cfg)
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    cfg.additional_target = "k_proj"
    model = minitune.load_model(tiny_dir / "model", dtype=torch.float32, quantize="nf4")
    with pytest.raises(TrainConfigError, match="'model.layers.0.self_attn.k_proj' holds a 4-bit layer"):
        apply_finetuning_type(model, cfg)


def test_adapter_whose_modules_do_not_fit_is_a_clear_error(ckpt, tmp_path):
    ours = ours_trained(ckpt["qwen2"], ["lm_head"])
    save_adapter(ours, tmp_path / "a")
    base = lambda: minitune.load_pretrained(ckpt["qwen2"], dtype=torch.float32)[0]  # noqa: E731
    files = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    config, tensors = json.loads(files[0].read_text()), load_file(files[1])
    cases = [({**config, "modules_to_save": ["lm_head", "nope"]}, tensors, "'nope' matches no module"),
             ({**config, "ensure_weight_tying": True}, tensors, "ensure_weight_tying=True"),  # qwen2: tied
             ({**config, "peft_type": "ADALORA"}, tensors, "modules_to_save=.'lm_head'. with AdaLoRA"),
             (config, {k: v for k, v in tensors.items() if "lm_head" not in k},
              "'base_model.model.lm_head.weight' is missing"),
             (config, {**tensors, "base_model.model.lm_head.weight": torch.zeros(3, 64)}, "has shape [3, 64]")]
    for i, (cfg, ts, says) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / files[0].name).write_text(json.dumps(cfg))
        minitune.model.checkpoint.save_safetensors(ts, folder / files[1].name)
        with pytest.raises(AdapterError, match=says.replace("[", r"\[")):
            load_adapter(base(), folder)
