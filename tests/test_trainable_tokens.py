"""Trainable token rows (minitune/peft/trainable_tokens.py) against Hugging Face PEFT: the same logits given
the same rows, alone and beside LoRA, with tied and untied heads; only the chosen rows train; the fused loss
keeps its numbers; it composes with AdaLoRA, adapters and the soft prompts; adapters move both ways; and
`minitune train --trainable_tokens` saves what `--adapter` reads back."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_factory import hf_load, rel_error, write_checkpoints
from safetensors.torch import load_file
from test_peft_training import logits, run_cli_train, tiny_dir  # noqa: F401  (tiny_dir: a module fixture)

import minitune
import minitune.cli as cli
import minitune.finetuning as finetuning
from minitune.peft import (AdaLoRAConfig, AdapterError, PrefixTuningModel, PromptTuningModel, PTuningModel,
                           TrainableTokensEmbedding, TrainableTokensHead, apply_adalora, apply_adapters, apply_lora,
                           apply_trainable_tokens, count_parameters, load_adapter, save_adapter, token_ids,
                           unload_trainable_tokens)
from minitune.peft.trainable_tokens import PEFT_LORA_KEY
from minitune.train.loss import causal_lm_loss, head_weight

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)
REL_TOL = 1e-5
ROWS = [5, 7, 300]  # three tokens of the 320-word vocabulary
KINDS = ["qwen2", "llama2"]  # qwen2: tied head (its rows train too); llama2: untied (only the embedding's)
IDS = torch.tensor([[5, 9, 7, 30, 300, 2, 41, 7, 5, 12]])  # every trained token, some twice


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoints(tmp_path_factory, KINDS)


def delta(d=64, seed=1):
    return 0.5 * torch.randn(len(ROWS), d, generator=torch.Generator().manual_seed(seed))


def ours_with_rows(path, lora=False):
    model, _ = minitune.load_pretrained(path, dtype=torch.float32)
    if lora:
        apply_lora(model, 4, 8, targets=["q_proj", "v_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    else:
        model.requires_grad_(False)
    apply_trainable_tokens(model, ROWS)
    with torch.no_grad():
        model.model.embed_tokens.delta.copy_(delta())
    return model.eval()


# ----------------------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_peft_trainable_tokens_given_the_same_delta(ckpt, kind):
    ref = peft.get_peft_model(hf_load(ckpt[kind]), peft.TrainableTokensConfig(token_indices=ROWS)).eval()
    layer = ref.base_model.model.model.embed_tokens
    with torch.no_grad():  # PEFT's tensor holds the new rows themselves: the old ones plus our delta
        layer.trainable_tokens_delta["default"].copy_(layer.trainable_tokens_original["default"] + delta())
    ours = ours_with_rows(ckpt[kind])
    assert isinstance(ours.lm_head, TrainableTokensHead) == (kind == "qwen2")
    with torch.no_grad():
        expected = ref(IDS).logits
        assert rel_error(ours(IDS), expected) < REL_TOL
        assert rel_error(minitune.load_pretrained(ckpt[kind])[0](IDS), expected) > 1e-3  # the rows matter
    assert count_parameters(ours)[0] == len(ROWS) * 64  # k x hidden; a tied head adds nothing


@pytest.mark.parametrize("kind", KINDS)
def test_peft_lora_adapter_with_trainable_token_indices_loads_with_same_logits(ckpt, kind, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=ROWS,
                          task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf_load(ckpt[kind]), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp_path)
    ours, _ = minitune.load_pretrained(ckpt[kind])
    load_adapter(ours, tmp_path)
    assert ours.model.embed_tokens.token_indices.tolist() == ROWS
    assert count_parameters(ours)[0] == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    with torch.no_grad():
        assert rel_error(ours(IDS), ref(IDS).logits) < REL_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_minitune_lora_adapter_with_token_rows_loads_into_peft(ckpt, kind, tmp_path):
    ours = ours_with_rows(ckpt[kind], lora=True)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == ROWS
    rows = load_file(tmp_path / "adapter_model.safetensors")[PEFT_LORA_KEY]  # PEFT's name, PEFT's meaning: the rows
    torch.testing.assert_close(rows, ours.model.embed_tokens.weight[ROWS] + delta())
    ref = peft.PeftModel.from_pretrained(hf_load(ckpt[kind]), tmp_path).eval()
    with torch.no_grad():
        expected = ours(IDS)
        assert rel_error(expected, ref(IDS).logits) < REL_TOL
        back, _ = minitune.load_pretrained(ckpt[kind])
        assert rel_error(load_adapter(back, tmp_path)(IDS), expected) < REL_TOL


def test_adalora_adapter_with_token_rows_loads_into_peft(ckpt, tmp_path):
    ours, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_adalora(ours, AdaLoRAConfig(total_step=10, init_r=4, target_r=2, lora_alpha=8, targets=["q_proj"]))
    apply_trainable_tokens(ours, ROWS)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_E" in name or name.endswith("delta"):
                p.normal_(0, 0.3)
    save_adapter(ours, tmp_path)
    ref = peft.PeftModel.from_pretrained(hf_load(ckpt["qwen2"]), tmp_path).eval()
    with torch.no_grad():
        assert rel_error(ours.eval()(IDS), ref(IDS).logits) < REL_TOL


# ----------------------------------------------------------------------------- training


def test_only_the_chosen_rows_change_after_an_optimizer_step_in_embedding_and_tied_head(ckpt):
    model, _ = minitune.load_pretrained(ckpt["qwen2"], dtype=torch.float32)
    model.requires_grad_(False)
    apply_trainable_tokens(model, ROWS)
    base = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": IDS.repeat(2, 1), "labels": IDS.repeat(2, 1)}
    causal_lm_loss(model.train(), batch)[0].backward()
    opt.step()
    emb, head = model.model.embed_tokens, model.lm_head
    assert torch.equal(emb.weight, base)  # E itself never moves
    moved = (emb.effective_weight() != base).any(-1).nonzero().squeeze(1).tolist()
    assert moved == ROWS
    assert torch.equal(head.effective_weight(), emb.effective_weight())  # the head is the same matrix
    with torch.no_grad():  # and it scores with it: only the chosen logits differ from the base head's
        h = torch.randn(4, 64)
        changed = (head(h) != F.linear(h, base)).any(0).nonzero().squeeze(1).tolist()
        assert changed == ROWS
        torch.testing.assert_close(head(h), F.linear(h, emb.effective_weight()))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_loss_equals_unfused_loss_and_gradients_with_token_rows(ckpt, kind):
    model = ours_with_rows(ckpt[kind], lora=True).train()
    head = model.lm_head
    assert head_weight(head) is not None  # the fused path is the one taken
    labels = IDS.repeat(3, 1).clone()
    labels[:, :3] = -100
    batch = {"input_ids": IDS.repeat(3, 1), "labels": labels}
    grads = []
    for fused in (True, False):
        loss, n = causal_lm_loss(model, batch, fused=fused)
        loss.backward()
        grads.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad()
    (fused_loss, g1), (plain_loss, g2) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert "model.embed_tokens.delta" in g1 and g1["model.embed_tokens.delta"].abs().sum() > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6)


BUILDERS = {"prompt": lambda m: PromptTuningModel(m, 4), "P-tuning": lambda m: PTuningModel(m, 4, "mlp", 16),
            "prefix": lambda m: PrefixTuningModel(m, 4), "adapter": lambda m: apply_adapters(m, 8)}


@pytest.mark.parametrize("method", BUILDERS)
def test_composes_with_prompt_tuning_prefix_and_adapters(ckpt, method):
    """method + rows gives the method's logits on a base whose rows were edited by hand; both kinds train."""
    torch.manual_seed(0)
    model = BUILDERS[method](minitune.load_pretrained(ckpt["qwen2"], dtype=torch.float32)[0])
    alone = count_parameters(model)[0]
    apply_trainable_tokens(model, ROWS)
    assert count_parameters(model)[0] == alone + len(ROWS) * 64
    inner = model.base if hasattr(model, "base") else model
    with torch.no_grad():
        inner.model.embed_tokens.delta.copy_(delta())
    torch.manual_seed(0)
    edited = minitune.load_pretrained(ckpt["qwen2"], dtype=torch.float32)[0]
    with torch.no_grad():
        edited.model.embed_tokens.weight[ROWS] += delta()  # tied: the head's rows too
    reference = BUILDERS[method](edited)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), reference.eval()(IDS), rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    causal_lm_loss(model.train(), {"input_ids": IDS, "labels": IDS})[0].backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("embed_tokens.delta") for n in moved)


def test_generate_with_the_kv_cache_sees_the_trained_rows(ckpt):
    model = ours_with_rows(ckpt["qwen2"], lora=True)
    with torch.no_grad():  # turn head row 7 (delta row 1) towards the last hidden state: 7 must come next
        h = model.hidden_states(IDS)[0, -1]
        model.model.embed_tokens.delta[1] += 50 * h / h.norm() ** 2
    out = minitune.generate(model, IDS, 8)
    assert out[0, IDS.shape[1]] == 7  # the cached decode scores with the trained head row
    merged = finetuning.merge_and_unload(model)  # rows folded into E, plain modules back: the same text
    assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(minitune.generate(merged, IDS, 8), out)


# ----------------------------------------------------------------------------- errors


class Vocab:
    def __init__(self, words):
        self.words = {w: i for i, w in enumerate(words)}

    def token_to_id(self, token):
        return self.words.get(token)


@pytest.mark.parametrize("rows,match", [([], "non-empty list"), ([5, 320], r"token id 320 is outside the vocabulary "
                                                                            r"\(0..319\)"),
                                        ([-1], "token id -1 is outside"), ([5, 5], "repeat an id"),
                                        ([True], "True is not an int")])
def test_bad_token_id_is_a_clear_error(ckpt, rows, match):
    model, _ = minitune.load_pretrained(ckpt["qwen2"])
    with pytest.raises(ValueError, match=match):
        apply_trainable_tokens(model, rows)
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # nothing was changed


def test_unknown_token_string_and_applying_twice_are_clear_errors(ckpt):
    vocab = Vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"])
    assert token_ids(vocab, "<|im_start|>, <|im_end|>") == [1, 2]
    assert token_ids(vocab, ["hello", "17"]) == [3, 17]  # digits are ids
    with pytest.raises(ValueError, match=r"'<\|im_stop\|>': it is not a token of the vocabulary"):
        token_ids(vocab, "<|im_start|>,<|im_stop|>")
    with pytest.raises(ValueError, match="no tokenizer"):
        token_ids(None, "<|im_end|>")
    model, _ = minitune.load_pretrained(ckpt["qwen2"])
    apply_trainable_tokens(model, ROWS)
    with pytest.raises(ValueError, match="already has trainable token rows"):
        apply_trainable_tokens(model, [1])
    assert isinstance(model.model.embed_tokens, TrainableTokensEmbedding)


def test_adapter_whose_rows_do_not_fit_is_refused_before_anything_changes(ckpt, tmp_path):
    save_adapter(ours_with_rows(ckpt["qwen2"], lora=True), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": [5, 7]}))
    model, _ = minitune.load_pretrained(ckpt["qwen2"])
    with pytest.raises(AdapterError, match=r"has shape \[3, 64\], but 2 tokens .* need \[2, 64\]"):
        load_adapter(model, tmp_path)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and not minitune.peft.lora.lora_layers(model)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": {"lm_head": ROWS}}))
    with pytest.raises(AdapterError, match="rows of embed_tokens"):
        load_adapter(model, tmp_path)


# ----------------------------------------------------------------------------- minitune train / chat


@pytest.mark.parametrize("ft", ["lora", "prompt"])
def test_cli_train_with_trainable_tokens_saves_them_and_adapter_reads_them_back(ft, tiny_dir, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    start, model = run_cli_train(tiny_dir, tmp_path / "out", ft, monkeypatch, "--trainable_tokens",
                                 "<|im_start|>,<|im_end|>")
    _, tok = minitune.load_pretrained(tiny_dir / "model")
    want = [tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")]
    rows = (model.base if ft == "prompt" else model).model.embed_tokens
    assert rows.token_indices.tolist() == want and rows.delta.abs().sum() > 0  # trained
    if ft == "lora":
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["trainable_token_indices"] == want
    else:
        assert json.loads((tmp_path / "out" / finetuning.METHOD_FILE).read_text())["trainable_token_indices"] == want
    fresh, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)
    reloaded = minitune.peft.load_adapter(fresh, tmp_path / "out")
    ids = torch.tensor([[want[0], 9, 30, want[1], 41, 7]])
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_trainable_tokens_key_is_refused_where_it_means_nothing(tiny_dir, tmp_path):  # noqa: F811
    base = ["train", "--model_name_or_path", str(tiny_dir / "model"), "--dataset", str(tiny_dir / "data.json"),
            "--output_dir", str(tmp_path / "o"), "--trainable_tokens", "<|im_end|>"]
    with pytest.raises(SystemExit, match="finetuning_type full trains the whole embedding already"):
        cli.main([*base, "--finetuning_type", "full"])
    with pytest.raises(SystemExit, match="stage dpo: only sft"):
        cli.main([*base, "--finetuning_type", "lora", "--stage", "dpo"])
    with pytest.raises(SystemExit, match=r"'<\|im_stop\|>': it is not a token of the vocabulary"):
        cli.main([*base[:-1], "<|im_stop|>", "--finetuning_type", "lora"])
