"""`minitune train` with every parameter-efficient finetuning_type, on a tiny random model.

For each of lora, adalora, adapter, prefix, prompt, ptuning: only the method's parameters change,
the final save reloads (`--adapter`) to the same logits, and generate/chat take `--adapter`.
AdaLoRA: the trainer's `after_step` hook runs the rank allocator, so the ranks shrink on the
cubic schedule and pruned triplets stay at zero; its regulariser joins the training loss.
"""
import io
import json
import re
import sys

import pytest
import torch

import minitune
import minitune.cli as cli
import minitune.finetuning as finetuning
from minitune.cli import main
from minitune.data import encode_segments, render_segments
from minitune.errors import UserError
from minitune.model import ModelConfig, Transformer
from minitune.peft.adalora import svd_layers
from minitune.tokenizer.bpe_trainer import train_bpe
from minitune.train import TrainConfig, train
from minitune.train.trainer import causal_lm_loss, planned_steps

torch.set_num_threads(1)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LINES = ["Who are you? I am minitune, a small model.", "What is two plus two? Four.",
         "The cat sat on the mat.", "Paris is the capital of France."] * 5
TYPES = ["lora", "adalora", "adapter", "prefix", "prompt", "ptuning"]
EXTRA = {"lora": ["--lora_rank", "4", "--lora_target", "q_proj,v_proj,down_proj"],
         "qlora": ["--lora_rank", "4", "--lora_target", "all"],
         "adalora": ["--adalora_init_r", "4", "--adalora_target_r", "2", "--adalora_tinit", "1",
                     "--adalora_tfinal", "1", "--lora_target", "all"],
         "adapter": ["--adapter_bottleneck", "8", "--adapter_mode", "parallel"],
         "prefix": ["--num_virtual_tokens", "3", "--prefix_projection", "--encoder_hidden_size", "16"],
         "prompt": ["--pre_seq_len", "4", "--prompt_tuning_init_text", "the capital of"],
         "ptuning": ["--num_virtual_tokens", "3", "--encoder_reparameterization_type", "LSTM",
                     "--encoder_hidden_size", "8"]}
STEPS = 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Qwen2-layout model (GQA) with a BPE tokenizer, and an Alpaca data file."""
    tok = train_bpe(LINES, vocab_size=320, special_tokens=SPECIALS, eos_token="<|endoftext|>",
                    pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_id, tie_word_embeddings=True)
    root = tmp_path_factory.mktemp("peft")
    minitune.save_pretrained(Transformer(cfg), tok, root / "model")
    data = [{"instruction": f"Say {w}", "output": f"{w} {w} {w}"} for w in ("cat", "mat", "sat", "two", "four", "Paris")]
    (root / "data.json").write_text(json.dumps(data * 3))
    return root


def base_name(name: str) -> str:
    """A wrapped model's parameter name -> the plain model's (LoRA's base_layer, the soft-prompt wrapper's base.)."""
    return name.removeprefix("base.").replace(".base_layer.", ".")


def run_cli_train(tiny_dir, out, ft, monkeypatch, *extra):
    """`minitune train` in-process; returns (model at the start, trained model) captured on the way."""
    seen = {}
    load, save = cli.load_for_training, cli.save_trained

    def load_spy(cfg, *args, **kw):
        model, tok = load(cfg, *args, **kw)
        seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, tok

    def save_spy(model, tok, cfg):
        seen["model"] = model
        return save(model, tok, cfg)

    monkeypatch.setattr(cli, "load_for_training", load_spy)
    monkeypatch.setattr(cli, "save_trained", save_spy)
    main(["train", "--model_name_or_path", str(tiny_dir / "model"), "--dataset", str(tiny_dir / "data.json"),
          "--finetuning_type", ft, "--output_dir", str(out), "--max_steps", str(STEPS), "--learning_rate", "1e-2",
          "--per_device_train_batch_size", "4", "--save_steps", "0", "--device", "cpu", "--logging_steps", "1",
          *EXTRA[ft], *extra])
    return seen["start"], seen["model"]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).float()


@pytest.mark.parametrize("ft", TYPES)
def test_each_type_trains_only_its_parameters_and_reloads(ft, tiny_dir, tmp_path, monkeypatch, capsys):
    start, model = run_cli_train(tiny_dir, tmp_path / "out", ft, monkeypatch)
    assert re.search(rf"trained {STEPS} steps .*{ft} adapter saved to", capsys.readouterr().out)
    base, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)
    base_sd = base.state_dict()
    method, changed = [], []
    for name, p in model.named_parameters():
        if base_name(name) in base_sd and not p.requires_grad:  # a base weight: frozen and untouched
            assert torch.equal(p, base_sd[base_name(name)]), f"{ft}: base weight {name} changed"
        else:
            assert p.requires_grad, f"{ft}: {name} is neither a base weight nor trainable"
            method.append(name)
            changed += [name] if not torch.equal(p, start[name]) else []
    assert method and len(changed) >= len(method) // 2, (ft, method, changed)
    trainable, total = minitune.peft.count_parameters(model)
    assert trainable == sum(model.get_parameter(n).numel() for n in method) and trainable < total / 2

    # the saved folder goes back onto a fresh base model with the same outputs
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" in files and "trainer_log.jsonl" in files  # the adapter did not replace output_dir
    assert ({"adapter_config.json", "adapter_model.safetensors"} if ft in ("lora", "adalora")
            else {finetuning.METHOD_FILE, finetuning.METHOD_WEIGHTS}) <= files
    fresh, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)
    reloaded = minitune.peft.load_adapter(fresh, tmp_path / "out")
    ids = torch.tensor([[5, 9, 30, 2, 41, 7]])
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(reloaded, ids), logits(base, ids), atol=1e-4)  # and it did learn something


def test_lora_adapter_is_peft_layout_and_export_merges(tiny_dir, tmp_path, monkeypatch):
    _, model = run_cli_train(tiny_dir, tmp_path / "out", "lora", monkeypatch, "--lora_alpha", "4", "--use_rslora",
                             "--export_dir", str(tmp_path / "merged"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 4, True)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tiny_dir / "model")
    merged, tok = minitune.load_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert tok is not None and isinstance(merged, Transformer)
    fresh, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)
    with_adapter = minitune.peft.load_adapter(fresh, tmp_path / "out")
    ids = torch.tensor([[5, 9, 30, 2, 41, 7]])
    torch.testing.assert_close(logits(merged, ids), logits(with_adapter, ids), rtol=1e-4, atol=1e-5)


def test_adalora_export_merges_the_pruned_svd_update(tiny_dir, tmp_path, monkeypatch):
    run_cli_train(tiny_dir, tmp_path / "out", "adalora", monkeypatch, "--export_dir", str(tmp_path / "merged"))
    merged, _ = minitune.load_pretrained(tmp_path / "merged", dtype=torch.float32)
    fresh, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32)
    with_adapter = minitune.peft.load_adapter(fresh, tmp_path / "out")
    ids = torch.tensor([[5, 9, 30, 2, 41, 7]])
    torch.testing.assert_close(logits(merged, ids), logits(with_adapter, ids), rtol=1e-4, atol=1e-5)


def _adalora_setup(tiny_dir, **kw):
    cfg = TrainConfig(**{**dict(
        finetuning_type="adalora", adalora_init_r=4, adalora_target_r=2, adalora_tinit=1, adalora_tfinal=2,
        max_steps=8, learning_rate=1e-2, per_device_train_batch_size=4, lr_scheduler_type="constant", save_steps=0,
        device="cpu", lora_target="q_proj,v_proj,o_proj", model_name_or_path=str(tiny_dir / "model"),
        dataset=str(tiny_dir / "data.json"), output_dir=str(tiny_dir / "unused")), **kw})
    from minitune.data import PaddingCollator, load_examples, prepare_sft

    tok = cli.training_tokenizer(cfg)
    data = prepare_sft(load_examples(tiny_dir / "data.json").examples, tok, "chatml", cutoff_len=64).train
    model, tok = cli.load_for_training(cfg, tok, n_train=len(data))  # the rank schedule is planned from the data
    return cfg, model, tok, data, PaddingCollator(tok)


def test_adalora_ranks_shrink_on_schedule_through_the_trainer_hook(tiny_dir):
    cfg, model, tok, data, collate = _adalora_setup(tiny_dir)
    hooks = finetuning.training_hooks(model, cfg)
    assert model.adalora_config.total_step == planned_steps(len(data), cfg) == 8  # set once, when the layers are made
    kept, calls = {}, []
    allocate = hooks["after_step"]

    def after_step(m, step):
        calls.append((step, all(p.grad is not None for p in m.parameters() if p.requires_grad)))
        allocate(m, step)
        kept[step] = sum(int((layer.lora_E != 0).sum()) for layer in svd_layers(m).values())

    train(model, data, cfg, collate=collate, loss_fn=hooks["loss_fn"], after_step=after_step)
    assert calls == [(s, True) for s in range(1, 9)]  # after every step, gradients still there
    n_layers = len(svd_layers(model))  # 2 layers x 3 targets
    assert n_layers == 6
    c = model.adalora_config
    # the cubic schedule: full budget through tinit=1, target from step total - tfinal = 6 on
    from minitune.peft import AdaLoRAController

    sched = AdaLoRAController(model, c)
    expected = {s: sched.budget_schedule(s)[0] for s in range(2, 7)}
    assert kept[1] == 4 * n_layers
    for s in range(2, 7):
        assert kept[s] == expected[s], (s, kept, expected)
    assert expected[2] < 4 * n_layers and expected[6] == 2 * n_layers
    assert kept[7] == kept[8] == 2 * n_layers  # after the final allocation AdamW does not revive pruned triplets
    assert sum(sum(v) for v in c.rank_pattern.values()) == 2 * n_layers


def test_adalora_regulariser_joins_the_training_loss_only(tiny_dir):
    cfg, model, tok, data, collate = _adalora_setup(tiny_dir)
    hooks = finetuning.training_hooks(model, cfg)
    batch = collate(data[:4])
    from minitune.peft import orth_regularizer

    model.train()
    loss, n, metrics = hooks["loss_fn"](model, batch)
    plain, n2 = causal_lm_loss(model, batch)
    torch.testing.assert_close(loss, plain + orth_regularizer(model, 0.5))
    torch.testing.assert_close(metrics["orth_reg"], orth_regularizer(model, 0.5).detach())  # logged on its own
    assert n == n2 and float(orth_regularizer(model, 0.5).detach()) > 0
    model.eval()
    torch.testing.assert_close(hooks["loss_fn"](model, batch)[0], causal_lm_loss(model, batch)[0])


def test_adalora_schedule_too_short_is_a_clear_error(tiny_dir):
    with pytest.raises(UserError, match="finetuning_type adalora: tinit=5, tfinal=2, total_step=6"):
        _adalora_setup(tiny_dir, adalora_tinit=5, max_steps=6)


def _greedy(model, tok, prompt, n=6):
    ids, _ = encode_segments(tok, render_segments("chatml", [{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True))
    stops = [tok.eos_id, tok.token_to_id("<|im_end|>")]
    out = minitune.generate(model.eval(), torch.tensor([ids]), n, eos_id=stops)
    return tok.decode([t for t in out[0, len(ids):].tolist() if t not in stops])


@pytest.mark.parametrize("ft", ["lora", "prefix"])
def test_generate_and_chat_take_the_adapter(ft, tiny_dir, tmp_path, monkeypatch, capsys):
    _, trained = run_cli_train(tiny_dir, tmp_path / "out", ft, monkeypatch)
    capsys.readouterr()
    args = ["--model", str(tiny_dir / "model"), "--adapter", str(tmp_path / "out"), "--max_new_tokens", "6",
            "--device", "cpu", "--dtype", "float32"]
    main(["generate", *args, "--template", "chatml", "--prompt", "Say cat"])
    _, tok = minitune.load_pretrained(tiny_dir / "model")
    assert capsys.readouterr().out == _greedy(trained, tok, "Say cat") + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say cat\n/exit\n"))
    main(["chat", *args])
    assert "Assistant: " + _greedy(trained, tok, "Say cat") + "\n" in capsys.readouterr().out


def test_bad_settings_and_adapters_are_clear_errors(tiny_dir, tmp_path, monkeypatch):
    base = ["train", "--model_name_or_path", str(tiny_dir / "model"), "--dataset", str(tiny_dir / "data.json"),
            "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"command line \(--lora_rank\): lora_rank: must be >= 1, got 0"):
        main([*base, "--finetuning_type", "lora", "--lora_rank", "0"])
    with pytest.raises(SystemExit, match="target module 'qkv_proj' is not a linear layer"):
        main([*base, "--finetuning_type", "lora", "--lora_target", "q_proj,qkv_proj"])
    with pytest.raises(SystemExit, match="adalora_target_r: 16 is above adalora_init_r 12"):
        main([*base, "--finetuning_type", "adalora", "--adalora_target_r", "16"])
    with pytest.raises(SystemExit, match="export_dir: merging into the weights needs finetuning_type lora or adalora"):
        main([*base, "--finetuning_type", "prefix", "--export_dir", str(tmp_path / "m")])
    # an adapter trained on another model shape
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    run_cli_train(tiny_dir, tmp_path / "ad", "adapter", monkeypatch)
    other = tmp_path / "other"
    tok = minitune.load_pretrained(tiny_dir / "model")[1]
    minitune.save_pretrained(Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)), tok, other)
    with pytest.raises(SystemExit, match=r"--adapter .*ad: .*has shape \[8, 32\], this model needs \[8, 48\]"):
        main(["chat", "--model", str(other), "--adapter", str(tmp_path / "ad")])
    with pytest.raises(SystemExit, match=r"--adapter .*nowhere.*adapter_config.json: not found"):
        main(["generate", "--model", str(other), "--adapter", str(tmp_path / "nowhere"), "--prompt", "x"])


def test_qlora_trains_lora_on_a_4bit_base_and_the_adapter_reloads_onto_nf4(tiny_dir, tmp_path, monkeypatch, capsys):
    from minitune.quant import Linear4bit

    start, model = run_cli_train(tiny_dir, tmp_path / "out", "qlora", monkeypatch)
    assert re.search(rf"trained {STEPS} steps .*qlora adapter saved to", capsys.readouterr().out)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * 2  # every linear but the tied head
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert any(not torch.equal(model.get_parameter(n), start[n]) for n in trained)
    # the PEFT-layout adapter goes back onto a freshly quantized base with the same outputs
    fresh, _ = minitune.load_pretrained(tiny_dir / "model", dtype=torch.float32, quantize="nf4")
    reloaded = minitune.peft.load_adapter(fresh, tmp_path / "out")
    ids = torch.tensor([[5, 9, 30, 2, 41, 7]])
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
