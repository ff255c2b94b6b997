"""minitune eval: benchmark folders read with file:line errors, LLaMA-Factory's letter scorer equal to the
same computation on transformers' logits, the log-likelihood scorer equal to lm-evaluation-harness choice by
choice, perplexity equal to transformers' on the same windows, the command end to end, the tiny world's suite.

The checkpoint is written by transformers (tests/hf_factory.py, Qwen2 layout) with the tiny model's
tokenizer beside it, so lm-eval's HFLM loads the very folder minitune loads.
"""

import csv
import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from hf_factory import hf_load, hf_model

import minitune
from minitune.cli import main
from minitune.eval import BenchmarkError, load_benchmark, score_choices, score_letters
from minitune.eval.letter import FEWSHOT, letter_ids, messages, prompt_ids
from minitune.eval.loglik import context, encode_pair
from minitune.eval.perplexity import perplexity, windows
from minitune.tiny.general_suite import general_ability, suite, write_general_suite

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny"
LL_TOL = 1e-4  # |minitune - lm-eval| per log-likelihood (float32, sums of a few log-probs)
LOGIT_TOL = 1e-4  # |minitune - transformers| per letter logit (float32; ours batched and left-padded)

ROWS = {  # MMLU's headerless rows: question, A, B, C, D, answer (commas, quotes, CJK on purpose)
    "capitals": {"dev": [["What is the capital city of France?", "Paris", "Rome", "Oslo", "Lima", "A"],
                         ["Which, of these, is \"big\"?", "a cat", "the sea", "一只猫", "dog", "B"],
                         ["What noise does a cow make?", "woof", "moo", "baa", "quack quack", "B"]],
                 "test": [["What is the capital city of Japan?", "Cairo", "Tokyo", "Oslo", "Lima", "B"],
                          ["What colour does the sky have?", "blue", "red", "绿色", "black and white", "A"],
                          ["What noise does a dog make?", "moo", "baa", "woof", "hiss", "C"]]},
    "sums": {"dev": [["What does 3+4 make?", "6", "7", "8", "12", "B"], ["What does 2+2 make?", "4", "5", "3", "22", "A"]],
             "test": [["What does 5+1 make?", "6", "7", "51", "4", "A"], ["What does 1+1 make?", "11", "3", "1", "2", "D"],
                      ["What does 0+9 make?", "90", "9", "8", "10", "B"]]},
}
MAPPING = {"capitals": {"name": "world facts", "category": "Humanities"}, "sums": {"name": "sums", "category": "STEM"}}


def write_mmlu(task_dir: Path, rows=ROWS, mapping=MAPPING) -> Path:
    for subject, splits in rows.items():
        for split, table in splits.items():
            d = task_dir / "mmlu" / "data" / split
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(table)
    if mapping:
        (task_dir / "mmlu" / "mapping.json").write_text(json.dumps(mapping))
    return task_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A transformers-written Qwen2 checkpoint with the tiny model's tokenizer (vocab 1380)."""
    path = tmp_path_factory.mktemp("ckpt")
    hf_model("qwen2", vocab_size=1380).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / f, path / f)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_mmlu(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def ours(ckpt):
    return minitune.load_pretrained(ckpt, dtype=torch.float32)


# ----------------------------------------------------------------------------- reading the folders


def test_mmlu_folder_reads_subjects_titles_categories_and_dev_rows(task_dir):
    subjects = load_benchmark(task_dir, "mmlu_test", n_shot=2)
    assert [s.name for s in subjects] == ["capitals", "sums"]
    cap = subjects[0]
    assert (cap.title, cap.category, len(cap.questions), len(cap.dev)) == ("world facts", "Humanities", 3, 3)
    assert cap.dev[1].question == 'Which, of these, is "big"?' and cap.dev[1].choices[2] == "一只猫"
    assert cap.questions[2].answer == "C" and cap.questions[2].label == 2


def test_cmmlu_and_ceval_layouts_read_the_same_questions(tmp_path):
    q = ["What does 5+1 make?", "6", "7", "51", "4", "A"]
    cm = tmp_path / "cmmlu" / "test"
    cm.mkdir(parents=True)
    with open(cm / "sums.csv", "w", newline="") as f:
        csv.writer(f).writerows([["", "Question", "A", "B", "C", "D", "Answer"], ["0", *q]])
    ce = tmp_path / "ceval" / "val"
    ce.mkdir(parents=True)
    with open(ce / "sums_val.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "question", "A", "B", "C", "D", "answer", "explanation"], ["0", *q, "1. 5+1=6"]])
    for task in ("cmmlu_test", "ceval_validation"):
        (s,) = load_benchmark(tmp_path, task)
        assert s.name == "sums" and (s.questions[0].question, s.questions[0].choices, s.questions[0].answer) == \
            (q[0], q[1:5], "A")


def bad_folder(tmp_path, table, subject="bad"):
    write_mmlu(tmp_path, {subject: {"test": table, "dev": table}}, mapping=None)
    return tmp_path


def test_an_answer_outside_a_to_d_names_file_and_line(tmp_path):
    bad_folder(tmp_path, [["q1", "a", "b", "c", "d", "A"], ["q2", "a", "b", "c", "d", "E"]])
    with pytest.raises(BenchmarkError, match=r"bad_test\.csv:2: answer 'E' \(expected one of A, B, C, D\)"):
        load_benchmark(tmp_path, "mmlu_test")


def test_a_missing_column_names_file_and_line(tmp_path):
    bad_folder(tmp_path, [["q1", "a", "b", "c", "d", "A"], ["q2", "a", "b", "c", "d"]])
    with pytest.raises(BenchmarkError, match=r"bad_test\.csv:2: 5 cells, expected 6 \(question, A, B, C, D, answer\)"):
        load_benchmark(tmp_path, "mmlu_test")
    d = tmp_path / "cmmlu" / "test"
    d.mkdir(parents=True)
    (d / "x.csv").write_text(",Question,A,B,C,D\n0,q,a,b,c,d\n")  # a header without Answer
    with pytest.raises(BenchmarkError, match=r"x\.csv:1: header has no column answer"):
        load_benchmark(tmp_path, "cmmlu_test")


def test_n_shot_larger_than_the_dev_split_says_so(tmp_path):
    bad_folder(tmp_path, [["q1", "a", "b", "c", "d", "A"], ["q2", "a", "b", "c", "d", "B"]])
    with pytest.raises(BenchmarkError, match=r"bad_dev\.csv: n_shot is 5 but this dev split has only 2 rows"):
        load_benchmark(tmp_path, "mmlu_test", n_shot=5)


def test_ceval_test_split_without_answers_points_to_validation(tmp_path):
    d = tmp_path / "ceval" / "test"
    d.mkdir(parents=True)
    (d / "law_test.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
    with pytest.raises(BenchmarkError, match="evaluate ceval_validation"):
        load_benchmark(tmp_path, "ceval_test")


# ----------------------------------------------------------------------------- the letter scorer


def test_letter_prompt_is_llamafactory_fewshot_layout(task_dir, ours):
    _, tok = ours
    s = load_benchmark(task_dir, "mmlu_test", n_shot=1)[1]
    text = FEWSHOT.render(messages(s.questions[0], s.dev[:1], s.title))
    assert text == ("The following are multiple choice questions (with answers) about sums.\n\n"
                    "What does 3+4 make?\nA. 6\nB. 7\nC. 8\nD. 12\nAnswer:B\n\n"
                    "What does 5+1 make?\nA. 6\nB. 7\nC. 51\nD. 4\nAnswer:")
    chatml = minitune.data.get_template("chatml").render(messages(s.questions[0], s.dev[:1], s.title, "zh"),
                                                         add_generation_prompt=True)
    assert chatml.startswith("<|im_start|>user\n以下是中国关于sums考试的单项选择题") and "\n答案：<|im_end|>\n" \
        "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nWhat does 5+1" in chatml
    assert tok.decode(prompt_ids(tok, FEWSHOT, s.questions[0], s.dev[:1], s, "en")) == text


@pytest.mark.parametrize("template", ["fewshot", "chatml"])
def test_letter_scorer_equals_transformers_logits_at_the_last_position(template, ckpt, task_dir, ours):
    model, tok = ours
    hf = hf_load(ckpt)
    ids = letter_ids(tok)
    for s in load_benchmark(task_dir, "mmlu_test", n_shot=2):
        got = score_letters(model, tok, s, n_shot=2, template=template, batch_size=2, rng=random.Random(7))
        rng = random.Random(7)  # the same draws of examples, one question at a time, no padding
        chat = FEWSHOT if template == "fewshot" else minitune.data.get_template(template)
        for q, logits, pred in zip(s.questions, got["letter_logits"], got["pred"]):
            row = prompt_ids(tok, chat, q, rng.sample(s.dev, 2), s, "en")
            with torch.no_grad():
                want = hf(torch.tensor([row])).logits[0, -1, ids]
            assert (torch.tensor(logits) - want).abs().max().item() < LOGIT_TOL
            assert pred == "ABCD"[int(want.argmax())]


# ----------------------------------------------------------------------------- the log-likelihood scorer

LM_EVAL_TASK = """task: local_{s}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {d}/test/{s}_test.csv
    dev: {d}/dev/{s}_dev.csv
  column_names: [question, A, B, C, D, answer]
  keep_default_na: false
output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "The following are questions (with answers) about {title}.\\n\\n"
doc_to_text: "Question: {{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{[A|string, B|string, C|string, D|string]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


@pytest.fixture(scope="module")
def lm_eval_samples(ckpt, task_dir, tmp_path_factory):
    """lm-evaluation-harness 0.4's own run (HFLM on the checkpoint folder) of the same CSVs as local tasks, 2-shot."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    yamls = tmp_path_factory.mktemp("lm_eval_tasks")
    for s, info in MAPPING.items():
        (yamls / f"{s}.yaml").write_text(LM_EVAL_TASK.format(s=s, d=task_dir / "mmlu" / "data", title=info["name"]))
    lm = HFLM(pretrained=str(ckpt), device="cpu", batch_size=4, dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"local_{s}" for s in MAPPING], num_fewshot=2,
                                  task_manager=TaskManager(include_path=str(yamls)), log_samples=True)
    return {task.removeprefix("local_"): sorted(samples, key=lambda x: x["doc_id"])
            for task, samples in out["samples"].items()}


def test_loglik_scorer_equals_lm_evaluation_harness_choice_by_choice(task_dir, ours, lm_eval_samples):
    model, tok = ours
    for s in load_benchmark(task_dir, "mmlu_test", n_shot=2):
        got = score_choices(model, tok, s, n_shot=2, batch_size=3)  # batches that cut across questions
        theirs = lm_eval_samples[s.name]
        assert len(theirs) == len(s.questions)
        for q, ll, acc, norm, nbytes, smp in zip(s.questions, got["ll"], got["correct"], got["correct_norm"],
                                                 got["correct_bytes"], theirs):
            assert smp["arguments"][0][0] == context(q, s.dev[:2], s.title)  # the same prompt text
            want = [r[0] for r in smp["filtered_resps"]]
            assert max(abs(a - b) for a, b in zip(ll, want)) < LL_TOL, (q.where, ll, want)
            assert (acc, norm, nbytes) == (smp["acc"] == 1.0, smp["acc_norm"] == 1.0, smp["acc_bytes"] == 1.0)


# ----------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once_with_the_stated_context():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (9, 5, 1), (3, 8, 4), (17, 6, 5)]:
        spans = windows(n, w, s)
        scored = [t for b, e, first in spans for t in range(first, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= w and first - b >= min(w - s, first) for b, e, first in spans)


def test_perplexity_equals_transformers_nll_over_the_same_windows(ckpt, ours):
    model, tok = ours
    hf = hf_load(ckpt)
    ids = tok.encode("The capital of France is Paris. 3+4=7. The cow says moo. " * 3)
    whole = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of tokens 1..N-1
    assert abs(perplexity(model, ids, window=len(ids), stride=len(ids))["nll"] - whole) < 1e-4
    total = 0.0
    for b, e, first in windows(len(ids), 16, 8):  # the strided method, token by token, with transformers
        logp = torch.log_softmax(hf(torch.tensor([ids[b:e]])).logits[0].double(), -1)
        total -= sum(logp[t - b - 1, ids[t]].item() for t in range(first, e))
    got = perplexity(model, ids, window=16, stride=8, batch_size=3)
    assert abs(got["nll"] - total / (len(ids) - 1)) < 1e-4 and got["tokens"] == len(ids) - 1
    assert abs(got["ppl"] - math.exp(got["nll"])) < 1e-9


# ----------------------------------------------------------------------------- the command


def test_minitune_eval_from_a_llamafactory_yaml(ckpt, task_dir, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model_name_or_path: {ckpt}\ntrust_remote_code: true\nfinetuning_type: lora\n"
                   f"task: mmlu_test\ntask_dir: {task_dir}\ntemplate: fewshot\nlang: en\nn_shot: 2\n"
                   f"save_dir: {tmp_path / 'out'}\nbatch_size: 2\nseed: 3\n")
    main(["eval", str(cfg)])
    out = capsys.readouterr()
    assert "Humanities" in out.out and "STEM" in out.out and "Average" in out.out
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["average"]["n"] == 6 and set(scores["subjects"]) == {"capitals", "sums"}
    assert scores["categories"]["STEM"]["n"] == 3 and scores["settings"]["n_shot"] == 2
    letters = json.loads((tmp_path / "out" / "results.json").read_text())  # LLaMA-Factory's results.json
    assert set(letters["sums"]) == {"0", "1", "2"} and set(letters["sums"].values()) <= set("ABCD")
    assert (tmp_path / "out" / "results.log").read_text().strip() in out.out
    with pytest.raises(SystemExit) as e:  # an existing save_dir is refused before any work
        main(["eval", str(cfg)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    main(["eval", str(cfg), "--scorer", "loglik", "--save_dir", str(tmp_path / "ll")])
    assert {"acc", "acc_norm", "acc_bytes"} <= set(json.loads((tmp_path / "ll" / "scores.json").read_text())["average"])
    text = tmp_path / "corpus.txt"
    text.write_text("The capital of France is Paris. The cow says moo.\n" * 4, encoding="utf-8")
    main(["eval", "--model", str(ckpt), "--task", "ppl", "--task_dir", str(text), "--cutoff_len", "16"])
    assert "stride 8" in capsys.readouterr().out


def test_minitune_eval_bad_input_is_one_line(ckpt, task_dir, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model_name_or_path: {ckpt}\ntask: mmlu_test\ntask_dir: {task_dir}\nn_shot: 9\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(cfg)])
    assert e.value.code == 2 and "n_shot is 9 but this dev split has only 3 rows" in capsys.readouterr().err
    cfg.write_text(f"model_name_or_path: {ckpt}\ntask: mmlu_test\nlearning_rate: 1e-4\n")
    with pytest.raises(SystemExit):
        main(["eval", str(cfg)])
    assert "unknown key 'learning_rate' for eval" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the tiny world's suite


def test_general_suite_folder_reads_back_as_the_suite(tmp_path):
    write_general_suite(tmp_path / "tiny_general")
    read = load_benchmark(tmp_path, "tiny_general_test", n_shot=5)
    made = suite()
    assert [s.name for s in read] == sorted(s.name for s in made)
    by_name = {s.name: s for s in made}
    for s in read:
        assert [(q.question, q.choices, q.answer) for q in s.questions] == \
            [(q.question, q.choices, q.answer) for q in by_name[s.name].questions]
        assert len(s.dev) == 5 and s.category == by_name[s.name].category
    questions = [q for s in made for q in s.questions]
    assert all(len(set(q.choices)) == 4 for q in questions)
    assert {q.answer for q in questions} == set("ABCD")  # the right option moves around


@pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="weights/tiny not built")
def test_the_pretrained_tiny_model_knows_the_suite_in_its_quiz_form_not_in_chatml():
    model, tok = minitune.load_pretrained(TINY, dtype=torch.float32)
    acc, per_subject = general_ability(model, tok, per_subject=True)
    assert acc > 0.6 and set(per_subject) == {"sums", "reversals", "capitals", "colours", "sounds"}
    assert general_ability(model, tok, scorer="chat") < 0.4  # chance is 0.25: it never saw a chat template


def test_trailing_context_whitespace_moves_to_the_continuation_as_lm_eval_does(ours):
    _, tok = ours
    assert encode_pair(tok, "Answer: ", "Paris") == encode_pair(tok, "Answer:", " Paris")
    ctx, cont = encode_pair(tok, "Answer:", " Paris")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: Paris")
