"""Lesson claims: each run.py states its findings as claims and checks them (minitune/classroom/claims.py).

The helper's report ends in exactly one `claims hold: k/n` line, lists what failed, says what --fast mode
left unchecked, and makes the lesson exit 1 when a claim about the tiny model fails (`make check-lessons`
relies on that). lessons/check_claims.py reads those reports back into markdown tables. The slow tests run
lessons 05 and 10 in full and require every claim to hold.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minitune.classroom import claims
from minitune.classroom.kit import load_exercises, select, student_readme

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_claims():
    claims.reset()
    yield
    claims.reset()


def summary_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("claims hold:")]


def test_report_prints_each_claim_with_its_measurement_and_ends_in_one_summary_line(capsys):
    claims.claim("SFT lifts exact match by 30 points", True, "0% -> 50%")
    claims.claim("capitals stay at 0%", True, "0 of 12")
    assert claims.report(fast=False) == 0
    out = capsys.readouterr().out
    assert "PASS #1 SFT lifts exact match by 30 points" in out and "measured: 0% -> 50%" in out
    assert summary_lines(out) == ["claims hold: 2/2"]
    assert out.rstrip().splitlines()[-1] == "claims hold: 2/2"


def test_a_failed_claim_is_named_and_fails_the_run_on_the_tiny_model(capsys):
    claims.claim("holds", True, "1")
    claims.claim("does not hold", False, "2")
    assert claims.report(fast=False) == 1
    assert claims.report(fast=False, model=claims.TINY) == 1
    out = capsys.readouterr().out
    assert "FAIL #2 does not hold" in out
    assert summary_lines(out)[0] == "claims hold: 1/2 (failed: #2)"


def test_another_model_is_shown_the_claims_but_not_failed_by_them(capsys, tmp_path):
    claims.claim("about the tiny model", False, "x")
    assert claims.report(fast=False, model=tmp_path) == 0
    assert "is not held to them" in capsys.readouterr().out


def test_fast_mode_counts_only_checked_claims_and_says_how_many_were_not(capsys):
    claims.claim("structural", True, "6 of 6")
    claims.not_checked(["training claim a", "training claim b"])
    assert claims.report(fast=True) == 0
    out = capsys.readouterr().out
    assert "not checked in --fast mode" in out
    assert summary_lines(out) == ["claims hold: 1/1 (fast mode: 2 claims not checked)"]


def test_finish_claims_exits_1_when_a_claim_fails():
    claims.claim("does not hold", False, "")
    with pytest.raises(SystemExit) as e:
        claims.finish_claims(fast=False)
    assert e.value.code == 1


def test_check_claims_reads_a_report_back_into_a_markdown_table(capsys):
    spec = importlib.util.spec_from_file_location("check_claims", ROOT / "lessons" / "check_claims.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    claims.claim("SFT lifts exact match by 30 points", True, "0% -> 50%")
    claims.claim("a | pipe", False, "3 | 4")
    claims.report(fast=False)
    parsed = check.parse(capsys.readouterr().out)
    assert parsed["summary"] == "1/2"
    assert parsed["claims"][0] == ("PASS", 1, "SFT lifts exact match by 30 points", "0% -> 50%")
    lines = check.table("05", {(0, 1): parsed, (1, 2): parsed})
    assert lines[2] == "| claim | seed 0, 1 thread | seed 1, 2 threads |"
    assert "| 2. a \\| pipe | **FAIL** 3 \\| 4 | **FAIL** 3 \\| 4 |" in lines


def test_every_lesson_ends_with_its_claims():
    """Each run.py calls finish_claims last (read statically: no lesson runs here)."""
    for run in sorted(ROOT.glob("lessons/[0-9][0-9]-*/run.py")):
        if run.parent.name.startswith("14-"):
            continue
        text = run.read_text(encoding="utf-8")
        assert "finish_claims(" in text and re.search(r"\bclaim\(", text), f"{run}: no claims"


@pytest.mark.slow
@pytest.mark.parametrize("lesson", ["05-sft", "10-reward-model"])
def test_lesson_in_full_mode_holds_every_claim(lesson, tmp_path):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, f"lessons/{lesson}/run.py", "--out", str(tmp_path / "run")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    found = summary_lines(proc.stdout)
    assert len(found) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    k, n = map(int, re.match(r"claims hold: (\d+)/(\d+)", found[0]).groups())
    assert k == n and n >= 4 and proc.returncode == 0, proc.stdout[-3000:]


def test_student_kit_readme_says_what_a_student_does_not_what_ci_runs():
    """The kit's README.md (minitune/classroom/kit.py writes it): read, fill the blanked regions, make grade-NN."""
    exercises = load_exercises(ROOT)["exercises"]
    text = student_readme(select(exercises, ["06"]), exercises)
    assert "make grade-06" in text and "# BEGIN EXERCISE NN.M" in text and "lessons/06-lora/README.md" in text
    assert all(e in text for e in select(exercises, ["06"]))
    assert "CI runs" not in text and "fails here" in text  # make test fails in a kit by design
