"""stage pt (issue 20): raw text (.txt lines, or the `text` field of JSON / JSONL, or the column dataset_info.json
maps `prompt` to) becomes EOS-ended documents packed into full cutoff_len blocks, every token a target; a
LLaMA-Factory-style config trains end to end (full and LoRA) on a transformers-written checkpoint, its first
logged loss equal to transformers' own causal-LM loss on the same blocks (1e-5 relative); unusable text stops
the run with one line naming the file and line."""

import json

import pytest
import torch

from minitune.cli import main
from minitune.data.pretrain import pack_texts, prepare_pretrain, read_texts
from hf_factory import hf_model
from rlhf_fixtures import pair_world

torch.set_num_threads(1)
DOCS = [f"The {w} sat on the mat number {i}, and then it went home to sleep." for i, w in
        enumerate(["cat", "dog", "fox", "owl", "cow", "hen", "pig", "rat"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A transformers-written Qwen2 checkpoint with a BPE tokenizer, and the documents as .txt, .jsonl and a
    registered c4_demo-style data set whose text sits in a `content` column."""
    _, tok = pair_world([{"prompt": d, "chosen": "", "rejected": ""} for d in DOCS])
    root = tmp_path_factory.mktemp("pt")
    hf = hf_model("qwen2", seed=3, vocab_size=tok.vocab_size)
    hf.save_pretrained(root / "model")
    tok.save(root / "model")
    (root / "docs.txt").write_text("\n".join(DOCS[:4]) + "\n\n" + "\n".join(DOCS[4:]) + "\n")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)))
    (root / "data").mkdir()
    (root / "data" / "c4_demo.json").write_text(json.dumps([{"content": d} for d in DOCS]))
    (root / "data" / "dataset_info.json").write_text(json.dumps(
        {"c4_demo": {"file_name": "c4_demo.json", "columns": {"prompt": "content"}}}))
    return root, tok, hf


def test_documents_end_with_eos_and_pack_into_full_blocks(world):
    root, tok, _ = world
    assert read_texts(root / "docs.txt") == DOCS  # the blank line holds no document
    assert read_texts(root / "docs.jsonl", max_samples=3) == DOCS[:3]
    stream = [t for d in DOCS for t in tok.encode(d) + [tok.eos_id]]
    blocks = pack_texts(DOCS, tok, 16)
    assert len(blocks) == len(stream) // 16 and all(len(b["input_ids"]) == 16 for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[:len(blocks) * 16]  # the tail is dropped
    assert all(b["labels"] == b["input_ids"] for b in blocks)  # every token is a target
    data = prepare_pretrain(DOCS, tok, 16, val_size=2, seed=0)
    assert len(data.train) + len(data.val) == len(blocks) and len(data.val) == 2
    assert f"{len(DOCS)} documents, {len(stream)} tokens" in data.summary()


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_llamafactory_pt_config_trains_and_its_first_loss_is_transformers(world, tmp_path, capsys, finetuning_type):
    root, tok, hf = world
    n_blocks = len(pack_texts(DOCS, tok, 32))
    cfg = tmp_path / "pt.yaml"
    cfg.write_text(f"""### model
model_name_or_path: {root / 'model'}
### method
stage: pt
do_train: true
finetuning_type: {finetuning_type}
lora_target: all
### dataset
dataset: c4_demo
dataset_dir: {root / 'data'}
cutoff_len: 32
### output
output_dir: {tmp_path / 'out'}
logging_steps: 1
save_steps: 0
### train
per_device_train_batch_size: {n_blocks}
max_steps: 2
learning_rate: 1.0e-3
device: cpu
""")
    main(["train", str(cfg)])
    out = capsys.readouterr().out
    assert f"-> {n_blocks} blocks of 32" in out and "pt: trained 2 steps" in out
    first = json.loads((tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()[0])["loss"]
    ids = torch.tensor([b["input_ids"] for b in pack_texts(DOCS, tok, 32)])  # one batch holds every block
    with torch.no_grad():
        want = hf(input_ids=ids, labels=ids).loss.item()  # blocks of one length: the token mean is the batch's
    assert first == pytest.approx(want, rel=1e-5)
    saved = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (tmp_path / "out" / saved).exists()


@pytest.mark.parametrize("held_out", [["--val_size", "2"], ["--eval_dataset", "docs.jsonl"]])
def test_txt_file_by_path_runs_with_a_held_out_loss(world, tmp_path, capsys, held_out):
    root, _, _ = world
    held_out = [held_out[0], held_out[1] if held_out[1] == "2" else str(root / held_out[1])]
    main(["train", "--stage", "pt", "--model_name_or_path", str(root / "model"), "--dataset", str(root / "docs.txt"),
          "--output_dir", str(tmp_path / "out"), "--cutoff_len", "16", "--max_steps", "1", "--save_steps", "0",
          "--per_device_train_batch_size", "2", "--device", "cpu", *held_out])
    assert "pt: trained 1 step" in capsys.readouterr().out
    assert "eval_loss" in (tmp_path / "out" / "trainer_log.jsonl").read_text()


def test_unusable_raw_text_names_the_file_and_line(world, tmp_path):
    root, _, _ = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}))
    args = ["train", "--stage", "pt", "--model_name_or_path", str(root / "model"), "--output_dir",
            str(tmp_path / "out"), "--device", "cpu", "--cutoff_len", "16"]
    with pytest.raises(SystemExit, match=r"bad.jsonl line 2: stage pt reads raw text from a string field 'text'"):
        main(args + ["--dataset", str(bad)])
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    with pytest.raises(SystemExit, match="fewer than one block of cutoff_len 16"):
        main(args + ["--dataset", str(short)])
    with pytest.raises(SystemExit, match="stage 'pt' with finetuning_type 'adapter' is not implemented"):
        main(args + ["--dataset", str(root / "docs.txt"), "--finetuning_type", "adapter"])
