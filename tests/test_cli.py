"""The command line: --help on every subcommand, `train` end to end from a YAML file plus flags,
`generate` on one prompt, and `chat` fed through a pipe."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minitune
from minitune.cli import main
from minitune.model import ModelConfig, Transformer
from minitune.tokenizer.bpe_trainer import train_bpe

torch.set_num_threads(1)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LINES = ["Who are you? I am minitune, a small model.", "What is two plus two? Four.",
         "The cat sat on the mat.", "Paris is the capital of France."] * 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Qwen2-layout model with a BPE tokenizer trained on a few lines, saved to disk."""
    tok = train_bpe(LINES, vocab_size=320, special_tokens=SPECIALS, eos_token="<|endoftext|>",
                    pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_id)
    path = tmp_path_factory.mktemp("tiny") / "model"
    minitune.save_pretrained(Transformer(cfg), tok, path)
    return path


@pytest.mark.parametrize("command", ["train", "generate", "chat"])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: minitune {command}" in text
    expected = {"train": ["--learning_rate", "--per_device_train_batch_size", "--lr_scheduler_type", "--bf16",
                          "--plot_loss", "--resume", "peak learning rate"],
                "generate": ["--prompt", "--adapter", "--template", "--top_p", "--dtype"],
                "chat": ["--model", "--adapter", "/reset", "/exit", "--max_new_tokens"]}[command]
    for word in expected:
        assert word in text


def test_python_dash_m_minitune_runs():
    out = subprocess.run([sys.executable, "-m", "minitune", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "chat" in out.stdout and "generate" in out.stdout


def test_train_from_yaml_and_flags(tiny_dir, tmp_path, capsys):
    data = [{"instruction": f"Say {w}", "output": f"{w} {w}"} for w in ("cat", "mat", "sat", "two", "four", "Paris")]
    (tmp_path / "data.json").write_text(json.dumps(data * 2))
    (tmp_path / "sft.yaml").write_text(
        f"model_name_or_path: {tiny_dir}\nstage: sft\nfinetuning_type: full\ndataset: {tmp_path / 'data.json'}\n"
        "template: chatml\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 4\nval_size: 2\n"
        f"logging_steps: 1\nsave_steps: 2\nplot_loss: true\noutput_dir: {tmp_path / 'out'}\n")
    main(["train", str(tmp_path / "sft.yaml"), "--max_steps", "3", "--device", "cpu", "--bf16"])
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_log.jsonl", "training_loss.png",
            "checkpoint-2"} <= {p.name for p in out.iterdir()}
    model, tok = minitune.load_pretrained(out)
    assert tok is not None and model.num_parameters() > 0
    assert "trained 3 steps" in capsys.readouterr().out


def test_grpo_resumes_from_its_last_checkpoint_and_plots_reward_and_kl(tiny_dir, tmp_path, capsys):
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps({"instruction": f"What is {a}+{b}?", "output": str(a + b)})
                                                 + "\n" for a, b in ((1, 2), (3, 4), (5, 6))))
    out = tmp_path / "out"
    args = ["train", "--stage", "grpo", "--finetuning_type", "lora", "--model_name_or_path", str(tiny_dir),
            "--dataset", str(tmp_path / "sums.jsonl"), "--output_dir", str(out), "--per_device_train_batch_size", "1",
            "--num_generations", "2", "--max_new_tokens", "4", "--device", "cpu", "--save_steps", "1"]
    main(args + ["--max_steps", "2"])  # stopped after step 2
    assert {"checkpoint-1", "checkpoint-2"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    main(args + ["--max_steps", "3", "--resume", "true", "--plot_loss"])
    printed = capsys.readouterr()
    assert f"resume: continuing from {out / 'checkpoint-2'} at step 2" in printed.out
    assert "grpo: 3 steps" in printed.out and "does not use" not in printed.err  # save_steps is used now
    assert [json.loads(x)["step"] for x in (out / "trainer_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "checkpoint-3").is_dir() and (out / "adapter_model.safetensors").exists()
    for key in ("reward", "kl"):  # plot_loss: the RL stages draw what they climb and what holds them back
        assert (out / f"training_{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_picks_the_adapters_initial_weights_whatever_ran_before(tiny_dir):
    from minitune.cli import load_for_training
    from minitune.train.config import TrainConfig

    def lora_a(seed):
        torch.rand(7)  # other random draws earlier in the process must not matter
        cfg = TrainConfig(stage="sft", finetuning_type="lora", model_name_or_path=str(tiny_dir), dataset="d.json",
                          output_dir="out", seed=seed)
        model = load_for_training(cfg)[0]
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    first = lora_a(1)
    assert torch.equal(first, lora_a(1))
    assert not torch.equal(first, lora_a(2))


def test_grpo_names_the_first_prompt_its_arithmetic_rule_cannot_score_before_training(tiny_dir, tmp_path):
    rows = [{"instruction": "What is 1+2?", "output": "3"},
            {"instruction": "Reverse the words: cat dog", "output": "dog cat"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"mixed.jsonl, example 2: the reward rule of stage grpo cannot score this "
                                         r"prompt \(no 'a\+b=' style problem .* 'Reverse the words: cat dog'\)"):
        main(["train", "--stage", "grpo", "--model_name_or_path", str(tiny_dir),
              "--dataset", str(tmp_path / "mixed.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert not (tmp_path / "out" / "trainer_log.jsonl").exists()  # stopped before the first step


def test_train_refuses_what_is_not_implemented(tiny_dir):
    with pytest.raises(SystemExit, match="stage 'rm' with finetuning_type 'adapter' is not implemented yet"):
        main(["train", "--stage", "rm", "--finetuning_type", "adapter", "--model_name_or_path", str(tiny_dir)])
    with pytest.raises(SystemExit, match=r"unknown key 'learnig_rate'; did you mean 'learning_rate'"):
        main(["train", "--learnig_rate", "1"])


def test_generate_one_prompt(tiny_dir, capsys):
    main(["generate", "--model", str(tiny_dir), "--template", "chatml", "--prompt", "Who are you?",
          "--max_new_tokens", "8", "--device", "cpu"])
    greedy = capsys.readouterr().out
    model, tok = minitune.load_pretrained(tiny_dir)
    from minitune.data import encode_segments, render_segments

    ids, _ = encode_segments(tok, render_segments("chatml", [{"role": "user", "content": "Who are you?"}],
                                                  add_generation_prompt=True))
    out = minitune.generate(model, torch.tensor([ids]), 8, eos_id=[tok.eos_id, tok.token_to_id("<|im_end|>")])
    new = [t for t in out[0, len(ids):].tolist() if t not in (tok.eos_id, tok.token_to_id("<|im_end|>"))]
    assert greedy == tok.decode(new) + "\n"


def test_generate_stops_where_transformers_generate_stops():
    """The committed tiny model's generation_config.json lists <|im_end|> and <|endoftext|> as eos; the
    base model ends a pretraining chat log with <|endoftext|>. `minitune generate` used to stop only at
    the tokenizer's eos and printed on past it; now it stops where transformers' greedy generate does."""
    transformers = pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1] / "weights" / "tiny"
    if not (root / "model.safetensors").exists():
        pytest.skip("weights/tiny is not built")
    from minitune.data import encode_segments, render_segments

    tok = minitune.load_pretrained(root)[1]
    ids, _ = encode_segments(tok, render_segments("chatml", [{"role": "user", "content": "What is 2 plus 3?"}],
                                                  add_generation_prompt=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(root)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert out[-1] == tok.token_to_id("<|endoftext|>") and len(out) < 24  # the case: a stop that is not eos_id
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["generate", "--model", str(root), "--template", "chatml", "--prompt", "What is 2 plus 3?",
              "--max_new_tokens", "24", "--device", "cpu"])
    assert buf.getvalue() == tok.decode(out[:-1]) + "\n"


def test_chat_through_a_pipe(tiny_dir, monkeypatch, capsys):
    # in-process with stdin replaced (a subprocess would spend ~10 s importing torch again)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\nhello\nand again\n/exit\n"))
    main(["chat", "--model", str(tiny_dir), "--device", "cpu", "--max_new_tokens", "5",
          "--temperature", "0.8", "--seed", "1"])
    out = capsys.readouterr().out
    assert "(history cleared)" in out
    assert out.count("Assistant: ") == 2
    assert out.count("User: ") == 4  # prompts for /reset, hello, and again, /exit


def test_chat_keeps_the_history_and_reset_clears_it(tiny_dir, monkeypatch):
    import minitune.chat as chat

    seen = []
    monkeypatch.setattr(chat, "reply", lambda model, tok, device, args, messages, prompt, out=None:
                        seen.append([m["content"] for m in messages]) or f"answer {len(seen)}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nmore\n/reset\nagain\n"))  # ends without /exit
    main(["chat", "--model", str(tiny_dir), "--system", "be brief"])
    assert seen == [["be brief", "hi"], ["be brief", "hi", "answer 1", "more"], ["be brief", "again"]]


def test_streamer_holds_back_a_possible_stop_string_and_cuts_at_it():
    from minitune.chat import StopGeneration, Streamer

    class CharTok:  # id i is the character chr(i)
        def decode(self, ids):
            return "".join(map(chr, ids))

    out = io.StringIO()
    s = Streamer(CharTok(), stop_ids={0}, stop="###", out=out)
    with pytest.raises(StopGeneration):
        for ch in "Hi #1 ok\n###more":
            s(torch.tensor([ord(ch)]))
            assert "###" not in out.getvalue()  # never prints a stop string, even half of one at the end
    assert out.getvalue() == s.text == "Hi #1 ok\n"


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(tiny_dir, monkeypatch, capsys):
    import minitune.chat as chat

    seen = []
    monkeypatch.setattr(chat, "reply", lambda model, tok, device, args, messages, prompt, out=None:
                        seen.append([m["content"] for m in messages]) or "ok")
    load = chat.load_for_inference

    def short_context(args):  # this model's config says 32768; pretend it was trained on 512
        model, tok, device = load(args)
        model.config.max_position_embeddings = 512
        return model, tok, device

    monkeypatch.setattr(chat, "load_for_inference", short_context)
    words = "the cat sat on the mat " * 8  # ~50 tokens a message with this tokenizer
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{i} {words}\n" for i in range(6)) + ("cat " * 400) + "\n"))
    # context 512, 256 of it reserved for the reply: a few messages fit
    main(["chat", "--model", str(tiny_dir), "--max_new_tokens", "256"])
    out = capsys.readouterr().out
    assert "oldest exchange" in out and "to fit the 512-token context" in out
    assert len(seen) == 6 and seen[0][0].startswith("0 ")
    assert not seen[-1][0].startswith("0 ") and seen[-1][-1].startswith("5 ")  # the newest is always kept
    assert "not sent: this message makes a" in out  # 400 words alone do not fit
    assert len(seen) == 6  # ... and nothing was generated for it
