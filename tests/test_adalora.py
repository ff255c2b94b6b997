"""AdaLoRA against Hugging Face PEFT: the budget schedule, the importance scores and the ranks kept
after each scheduled prune, given the same weights and the same gradients; the orthogonal
regulariser; and adapters that move both ways with the same logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_factory import hf_load, rel_error, write_checkpoint
from safetensors.torch import load_file

import minitune
from minitune.peft import (AdaLoRAConfig, AdaLoRAController, AdapterError, SVDLinear, apply_adalora, load_adapter,
                           orth_regularizer, save_adapter)
from minitune.peft.adalora import ranks

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5
# 10 steps: warm-up to step 2, cubic decay to step 7 pruning every 2nd step, then 3 frozen steps
SCHEDULE = dict(total_step=10, tinit=2, tfinal=3, deltaT=2, init_r=6, target_r=3, lora_alpha=8)
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]  # GQA-sized k/v, and a wide input (down_proj)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    write_checkpoint("qwen2", path)
    return path


def peft_config(**kw):
    return peft.AdaLoraConfig(**{**SCHEDULE, **kw}, target_modules=TARGETS, task_type="CAUSAL_LM")


def ids(seed=0, shape=(2, 24)):
    return torch.randint(3, 320, shape, generator=torch.Generator().manual_seed(seed))


def peft_key(name):  # ours "model.layers.0.mlp.down_proj.lora_A" -> PEFT's parameter name
    return name + ".default"


@pytest.mark.parametrize("kw", [SCHEDULE, dict(SCHEDULE, deltaT=1, tinit=0, tfinal=0),
                                dict(total_step=50, tinit=5, tfinal=10, deltaT=3, init_r=12, target_r=4)])
def test_budget_schedule_matches_peft_at_every_step(ckpt, kw):
    ref = peft.get_peft_model(hf_load(ckpt), peft_config(**kw))
    ours, _ = minitune.load_pretrained(ckpt)
    ctl = AdaLoRAController(apply_adalora(ours, AdaLoRAConfig(**kw, targets=TARGETS)))
    alloc = ref.base_model.rankallocator
    assert (ctl.init_bgt, ctl.target_bgt) == (alloc.init_bgt, alloc.target_bgt)
    for step in range(kw["total_step"] + 2):
        assert ctl.budget_schedule(step) == alloc.budget_schedule(step), step


def copy_weights_into_peft(ours, ref):
    with torch.no_grad():
        params = dict(ref.base_model.model.named_parameters())
        for name, p in ours.named_parameters():
            if "lora_" in name:
                params[peft_key(name)].copy_(p)


def test_importance_scores_and_ranks_match_peft_on_same_gradients(ckpt):
    """Train our model; after every step hand PEFT the same weights and the same gradients and let
    both allocators run: EMAs, triplet scores, budgets and kept ranks must agree at every step."""
    torch.manual_seed(0)
    ours, _ = minitune.load_pretrained(ckpt)
    apply_adalora(ours, AdaLoRAConfig(**SCHEDULE, targets=TARGETS))
    with torch.no_grad():  # E starts at zero, which would give A and B zero gradients at first
        for m in ours.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_(0, 0.5)
    ctl = AdaLoRAController(ours)
    ref = peft.get_peft_model(hf_load(ckpt), peft_config())
    alloc, ref_params = ref.base_model.rankallocator, dict(ref.base_model.model.named_parameters())
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
    x = ids(seed=4, shape=(4, 32))
    pruned_steps = []
    for step in range(SCHEDULE["total_step"]):
        logits = ours(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        (loss + orth_regularizer(ours, 0.5)).backward()
        opt.step()
        copy_weights_into_peft(ours, ref)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "lora_" in name:
                    ref_params[peft_key(name)].grad = p.grad.clone()
        budget, pattern = ctl.update_and_allocate(ours, step)
        ref.base_model.update_and_allocate(step)
        assert budget == alloc.budget_schedule(step)[0]
        if step < SCHEDULE["total_step"] - SCHEDULE["tfinal"]:  # PEFT drops its statistics after the final prune
            for key in ctl.exp_avg_ipt:
                assert rel_error(ctl.exp_avg_ipt[key], alloc.exp_avg_ipt[peft_key(key)]) < REL_TOL, key
                assert rel_error(ctl.exp_avg_unc[key], alloc.exp_avg_unc[peft_key(key)]) < REL_TOL, key
            for key, score in ctl.triplet_scores().items():
                name = key.removesuffix(".lora_E")
                ref_score = (alloc._element_score(peft_key(key)).view(-1)
                             + alloc._element_score(peft_key(name + ".lora_A")).mean(1)
                             + alloc._element_score(peft_key(name + ".lora_B")).mean(0))
                assert rel_error(score.view(-1), ref_score) < REL_TOL, key
        ref_pattern = ref.peft_config["default"].rank_pattern
        if pattern is not None:
            pruned_steps.append(step)
            assert pattern == {k.removesuffix(".default"): v for k, v in ref_pattern.items()}
        for name, p in ours.named_parameters():  # masks applied identically, E zero exactly where pruned
            if name.endswith("lora_E"):
                assert torch.equal(p, ref_params[peft_key(name)]), (step, name)
        opt.zero_grad()
    assert pruned_steps == [4, 6, 7]
    kept = ranks(ctl.config.rank_pattern)
    assert sum(kept.values()) == ctl.target_bgt == 3 * len(kept) and len(set(kept.values())) > 1, kept
    for name, r in kept.items():
        assert int((ours.get_submodule(name).lora_E != 0).sum()) == r


def test_orth_regularizer_matches_peft_loss(ckpt):
    ours, _ = minitune.load_pretrained(ckpt)
    apply_adalora(ours, AdaLoRAConfig(**SCHEDULE, targets=TARGETS))
    ref = peft.get_peft_model(hf_load(ckpt), peft_config(orth_reg_weight=0.3))
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_(0, 0.5)
    copy_weights_into_peft(ours, ref)
    x = ids(seed=2)
    with torch.no_grad():
        logits = ours(x)
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        reg = orth_regularizer(ours, 0.3)
        expected = ref(input_ids=x, labels=x).loss
    assert reg > 0.01
    assert rel_error(lm + reg, expected) < REL_TOL


def pruned_model(ckpt, steps=SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):
    torch.manual_seed(1)
    ours, _ = minitune.load_pretrained(ckpt)
    apply_adalora(ours, AdaLoRAConfig(**SCHEDULE, targets=TARGETS))
    ctl = AdaLoRAController(ours)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_(0, 0.5)
    x = ids(seed=6, shape=(4, 32))
    for step in range(steps):
        logits = ours(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        (loss + orth_regularizer(ours, 0.5)).backward()
        opt.step()
        ctl.update_and_allocate(ours, step)
        opt.zero_grad()
    return ours.eval()


# PEFT (0.21) checks every rank_pattern key against its module names and warns that AdaLoRA's keys, which
# name the `lora_E` parameters, match none; it then uses them all the same (its own save -> load round
# trip warns alike). The test below checks that PEFT's modules get exactly the ranks our keys give.
PEFT_RANK_PATTERN_WARNING = "ignore:The following rank_pattern keys did not match:RuntimeWarning"


@pytest.mark.filterwarnings(PEFT_RANK_PATTERN_WARNING)
def test_saved_adapter_loads_into_peft_with_same_logits(ckpt, tmp_path):
    ours = pruned_model(ckpt)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 3
    kept = ranks(cfg["rank_pattern"])
    assert sorted(kept) == sorted(n for n, m in ours.named_modules() if isinstance(m, SVDLinear))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, r in kept.items():  # pruned triplets are not saved, as PEFT does
        assert tensors[f"base_model.model.{name}.lora_A"].shape[0] == r
        assert tensors[f"base_model.model.{name}.lora_B"].shape[1] == r
    ref = peft.PeftModel.from_pretrained(hf_load(ckpt), tmp_path).eval()
    assert {n.removeprefix("base_model.model."): m.lora_A["default"].shape[0]
            for n, m in ref.named_modules() if hasattr(m, "lora_E")} == kept  # PEFT resized by our rank_pattern
    with torch.no_grad():
        expected = ours(ids())
        assert rel_error(expected, ref(ids()).logits) < REL_TOL
        base, _ = minitune.load_pretrained(ckpt)
        assert rel_error(base(ids()), expected) > 1e-3  # the adapter does something
        # and back into a plain minitune model
        back, _ = minitune.load_pretrained(ckpt)
        minitune.peft.load_adapter(back, tmp_path)
        assert rel_error(back(ids()), expected) < REL_TOL
        assert {n: m.lora_A.shape[0] for n, m in back.named_modules() if isinstance(m, SVDLinear)} == kept


def test_peft_adalora_adapter_loads_into_minitune(ckpt, tmp_path):
    """PEFT trains and prunes (its own gradients), saves; minitune loads the pruned adapter."""
    ref = peft.get_peft_model(hf_load(ckpt), peft_config())
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    x = ids(seed=7, shape=(4, 32))
    for step in range(8):
        ref.train()
        ref(input_ids=x, labels=x).loss.backward()
        opt.step()
        ref.base_model.update_and_allocate(step)
        opt.zero_grad()
    ref.eval()
    ref.save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt)
    minitune.peft.load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert rel_error(ours(ids()), ref(ids()).logits) < REL_TOL


def test_bad_adalora_adapters_are_errors(ckpt, tmp_path):
    ours = pruned_model(ckpt)
    save_adapter(ours, tmp_path)
    f = tmp_path / "adapter_config.json"
    good = json.loads(f.read_text())
    cases = [(dict(init_r=8), r"rank_pattern\[.*\] has 6 entries, init_r is 8"),
             (dict(target_modules=["q_proj", "kv_proj"]), r"'kv_proj' is not a linear layer"),
             (dict(rank_pattern={k: [True] * 6 for k in good["rank_pattern"]}), r"has shape \[\d, 64\].*needs \[6, 64\]"),
             (dict(tinit=9), "leave no steps")]
    for change, message in cases:
        f.write_text(json.dumps({**good, **change}))
        fresh, _ = minitune.load_pretrained(ckpt)
        with pytest.raises(AdapterError, match=message):
            load_adapter(fresh, tmp_path)
        assert not any(isinstance(m, SVDLinear) for m in fresh.modules())


def test_config_rejects_schedules_peft_rejects():
    with pytest.raises(ValueError, match="total_step"):
        AdaLoRAConfig(total_step=0)
    with pytest.raises(ValueError, match="no steps"):
        AdaLoRAConfig(total_step=10, tinit=5, tfinal=5)


def test_svd_layer_owns_its_update_merge_and_unmerge():
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(12, 10), r=4, alpha=8.0)
    assert layer.alpha == 8.0 and layer.scaling == 8.0 / (4 + 1e-5)  # scaling: what multiplies P diag(Λ) Q
    with torch.no_grad():
        layer.lora_E.normal_()
        x = torch.randn(3, 12)
        y, w0 = layer(x), layer.base_layer.weight.clone()
        torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.lora_B @ torch.diag(
            layer.lora_E.view(-1)) @ layer.lora_A)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
