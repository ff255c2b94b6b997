"""LoRA against Hugging Face PEFT on checkpoints written by transformers: adapters move both ways
with the same logits, merging changes nothing, parameter counts are PEFT's, bad adapters are refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hf_factory import hf_load, rel_error, write_checkpoints
from safetensors.torch import load_file, save_file

import minitune
from minitune.peft import (AdapterError, LoRALinear, apply_lora, count_parameters, load_adapter, lora_state_dict,
                           merge_lora, print_trainable_parameters, save_adapter, unmerge_lora)
from minitune.peft.lora import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5
KINDS = ["qwen2", "llama3"]  # qwen2: GQA 4q/2kv heads with q/k/v bias; llama3: 1 kv head, llama3 rope
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One checkpoint per family for the whole module: writing them is the slow part."""
    return write_checkpoints(tmp_path_factory, KINDS)


def ids(seed=0, shape=(2, 24)):
    return torch.randint(3, 320, shape, generator=torch.Generator().manual_seed(seed))


def peft_lora(path, targets, r=4, alpha=8, use_rslora=False, seed=0):
    """A PEFT LoRA model whose B is random (PEFT initialises it to zero, which would test nothing)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_load(path), cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_into_minitune_with_same_logits(ckpt, tmp_path, kind, targets):
    ref = peft_lora(ckpt[kind], TARGETS[targets])
    ref.save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt[kind])
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL
        for m in lora_layers(ours).values():  # the textbook path of LoRALinear's switch, too
            m.fast = False
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL
    # and the LoRA path is really in use: without it the logits differ
    base, _ = minitune.load_pretrained(ckpt[kind])
    with torch.no_grad():
        assert rel_error(base(ids()), ref(ids()).logits) > 1e-3


def train_a_few_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = ids(seed=5, shape=(4, 32))
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])  # LoRALinear's switch: both paths equal PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_minitune_trained_adapter_loads_into_peft_with_same_logits(ckpt, tmp_path, kind, fast):
    ours, _ = minitune.load_pretrained(ckpt[kind])
    base_before = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, r=4, alpha=8, targets="all-linear", fast=fast)
    assert all(m.fast is fast for m in lora_layers(ours).values())
    train_a_few_steps(ours)
    # training moved the adapter and nothing else
    assert all(t.abs().max() > 0 for k, t in lora_state_dict(ours).items() if "lora_B" in k)
    for k, v in ours.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k.replace(".base_layer", "")]), k
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ckpt[kind]))
    ref = peft.PeftModel.from_pretrained(hf_load(ckpt[kind]), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == str(ckpt[kind])
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_saved_tensor_names_are_peft_names(ckpt, tmp_path):
    ref = peft_lora(ckpt["qwen2"], ["q_proj", "v_proj"])
    ref.save_pretrained(tmp_path / "peft")
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    load_adapter(ours, tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    theirs, mine = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(mine)
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" in mine
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_changes_no_output_and_unmerge_restores_weights(ckpt, tmp_path, kind):
    ref = peft_lora(ckpt[kind], "all-linear")
    ref.save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt[kind])
    load_adapter(ours, tmp_path)
    w0 = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        before = ours(ids())
        merge_lora(ours)
        merged = ours(ids())
        assert rel_error(merged, before) < REL_TOL
        q = ours.model.layers[0].self_attn.q_proj
        assert not torch.equal(q.base_layer.weight, w0["model.layers.0.self_attn.q_proj.base_layer.weight"])
        unmerge_lora(ours)
        for k, v in ours.state_dict().items():
            assert torch.allclose(v, w0[k], atol=1e-6, rtol=0), k
        assert rel_error(ours(ids()), before) < REL_TOL


def expected_lora_count(cfg, r, targets):
    h, kv, i = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    shapes = dict(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv), o_proj=(q, h),
                  gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
    names = shapes if targets == "all-linear" else targets
    return cfg.num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameter_count_is_exact_and_equals_peft(ckpt, kind, targets):
    ours, _ = minitune.load_pretrained(ckpt[kind])
    apply_lora(ours, r=8, alpha=16, targets=TARGETS[targets])
    ref = peft.get_peft_model(hf_load(ckpt[kind]), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[targets]))
    trainable, total = count_parameters(ours)
    assert (trainable, total) == ref.get_nb_trainable_parameters()
    assert trainable == expected_lora_count(ours.config, 8, TARGETS[targets])
    assert trainable == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in ours.named_parameters())
    # GQA: k_proj's B is [kv_heads * head_dim, r], smaller than q_proj's
    if targets == "all":
        k = ours.model.layers[0].self_attn.k_proj
        assert k.lora_B.weight.shape == (ours.config.num_key_value_heads * ours.config.head_dim, 8)


def test_parameter_table_ends_with_peft_line(ckpt, capsys):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_lora(ours, r=4, alpha=8, targets=["q_proj", "v_proj"])
    print_trainable_parameters(ours)
    mine = capsys.readouterr().out.strip().splitlines()
    peft.get_peft_model(hf_load(ckpt["qwen2"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                        ).print_trainable_parameters()
    theirs = capsys.readouterr().out.strip().splitlines()
    assert mine[-1] == theirs[-1]
    assert any("self_attn.q_proj.lora_A.weight" in line for line in mine)


@pytest.mark.parametrize("kind", KINDS)
def test_rslora_scaling_and_parity(ckpt, tmp_path, kind):
    ref = peft_lora(ckpt[kind], ["q_proj", "k_proj", "v_proj"], r=16, alpha=8, use_rslora=True)
    ref.save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt[kind])
    load_adapter(ours, tmp_path)
    q = ours.model.layers[1].self_attn.q_proj
    assert q.scaling == pytest.approx(8 / math.sqrt(16)) and q.scaling != 8 / 16
    with torch.no_grad():
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL
        for m in lora_layers(ours).values():  # the textbook path of LoRALinear's switch, too
            m.fast = False
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL
    save_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_rslora"] is True


def test_dropout_only_in_train_mode(ckpt):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_lora(ours, r=4, alpha=8, dropout=0.5, targets="all-linear")
    plain, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_lora(plain, r=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
        plain.load_state_dict(ours.state_dict())
        ours.eval()
        assert torch.equal(ours(ids()), ours(ids()))
        assert rel_error(ours(ids()), plain(ids())) < REL_TOL
        ours.train()
        torch.manual_seed(0)
        a = ours(ids())
        b = ours(ids())
        assert rel_error(a, b) > 1e-4 and rel_error(a, plain(ids())) > 1e-4


def test_generation_with_lora_equals_merged_generation(ckpt, tmp_path):
    peft_lora(ckpt["llama3"], "all-linear").save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt["llama3"])
    load_adapter(ours, tmp_path)
    prompt = ids(seed=3, shape=(1, 8))
    with_lora = minitune.generate(ours, prompt, max_new_tokens=12)
    merge_lora(ours)
    assert minitune.generate(ours, prompt, max_new_tokens=12).tolist() == with_lora.tolist()


def test_save_replaces_folder_and_leaves_no_temporaries(ckpt, tmp_path):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_lora(ours, r=2, alpha=4)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "stale.txt").write_text("old")
    save_adapter(ours, tmp_path / "ad")
    save_adapter(ours, tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---- bad adapters: clear errors naming the file, the tensor and the shapes; the model is left alone

@pytest.fixture
def peft_dir(ckpt, tmp_path):
    peft_lora(ckpt["qwen2"], ["q_proj", "v_proj"]).save_pretrained(tmp_path / "ad")
    return tmp_path / "ad"


def edit_config(path, **changes):
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def load_fresh(ckpt, path):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    try:
        load_adapter(ours, path)
    finally:
        assert not any(isinstance(m, LoRALinear) for m in ours.modules()), "a failed load must not change the model"


def test_wrong_r_in_config_is_an_error(ckpt, peft_dir):
    edit_config(peft_dir, r=8)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors.*q_proj.lora_A.weight.*\[4, 64\].*r=8"):
        load_fresh(ckpt, peft_dir)


def test_unknown_target_module_is_an_error(ckpt, peft_dir):
    edit_config(peft_dir, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(AdapterError, match=r"adapter_config.json.*'query_key_value'.*not a linear layer"):
        load_fresh(ckpt, peft_dir)


def test_adapter_for_a_different_hidden_size_is_an_error(tmp_path, ckpt):
    from hf_factory import hf_model

    other = peft.get_peft_model(hf_model("qwen2", hidden_size=96),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterError, match=r"tensor '.*lora_A.weight' has shape \[4, 96\].*needs \[4, 64\]"):
        load_fresh(ckpt, tmp_path / "other")


def test_missing_and_extra_tensors_are_errors_not_partial_loads(ckpt, peft_dir):
    f = peft_dir / "adapter_model.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if "layers.2.self_attn.v_proj" not in k}, f)
    with pytest.raises(AdapterError, match=r"no adapter tensors for \['model.layers.2.self_attn.v_proj'\]"):
        load_fresh(ckpt, peft_dir)
    edit_config(peft_dir, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"tensors for \['model.layers.0.self_attn.v_proj'.*do not select"):
        load_fresh(ckpt, peft_dir)


def test_unsupported_config_is_an_error(ckpt, peft_dir):
    edit_config(peft_dir, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_fresh(ckpt, peft_dir)


def test_apply_lora_refuses_unknown_target_and_bad_rank(ckpt):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    with pytest.raises(AdapterError, match="'qkv' is not a linear layer"):
        apply_lora(ours, targets=["qkv"])
    with pytest.raises(ValueError, match="positive"):
        apply_lora(ours, r=0)
