"""Student kits and the grader: markers are consistent, a kit never holds the blanked solutions,
grading gives zero with the pointer messages in a kit and full marks once the bodies are back."""
import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minitune.classroom import grade, kit

ROOT = Path(__file__).resolve().parents[1]
DATA = kit.load_exercises(ROOT)
EXERCISES = DATA["exercises"]
# graded in the kit test: one exercise per source file, so each one's tests see only its own blank
KIT_SUBSET = ["02.2", "10.1", "11.1", "13.1"]


def test_every_exercise_is_marked_once_listed_and_has_tests():
    marked = {}
    for path in (ROOT / "minitune").rglob("*.py"):
        for ex_id, region in kit.find_regions(path.read_text(encoding="utf-8"), str(path)).items():
            assert ex_id not in marked, f"{ex_id} marked in {marked.get(ex_id)} and {path}"
            marked[ex_id] = (path.relative_to(ROOT).as_posix(), region.title)
    assert set(marked) == set(EXERCISES), "markers in the code and lessons/exercises.json disagree"
    for ex_id, ex in EXERCISES.items():
        assert marked[ex_id] == (ex["file"], ex["title"]), ex_id
        lesson_dir = ex["lesson"].rsplit("/", 1)[0]
        assert re.fullmatch(rf"lessons/{ex_id[:2]}-[a-z0-9-]+", lesson_dir) and ex["lesson"].endswith("/README.md")
        if (ROOT / lesson_dir).is_dir():
            assert ex_id in (ROOT / ex["lesson"]).read_text(encoding="utf-8"), f"{ex['lesson']} does not describe {ex_id}"
        assert ex["points"] > 0 and ex["tests"]
        for spec in ex["tests"]:
            file, _, name = spec.partition("::")
            assert (ROOT / file).is_file(), spec
            assert name.split("[")[0] in (ROOT / file).read_text(encoding="utf-8"), spec
    for lesson in ("01", "02", "03"):
        assert sum(e.startswith(lesson + ".") for e in EXERCISES) >= 2


def test_markers_are_comments_only():
    for f in {ex["file"] for ex in EXERCISES.values()}:
        text = (ROOT / f).read_text(encoding="utf-8")
        bare = "\n".join(ln for ln in text.split("\n") if not (kit.BEGIN_RE.match(ln) or kit.END_RE.match(ln)))
        assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(bare)), f


def test_blank_then_restore_gives_the_original_text():
    for ex_id, ex in EXERCISES.items():
        original = (ROOT / ex["file"]).read_text(encoding="utf-8")
        blanked = kit.blank(original, [ex_id], EXERCISES)
        compile(blanked, ex["file"], "exec")  # indentation is right
        line = f'raise NotImplementedError("Exercise {ex_id}: see {ex["lesson"]}")'
        assert line in blanked and not set(kit.solution_lines(original, ex_id)) <= set(blanked.split("\n"))
        assert kit.restore(blanked, original, [ex_id]) == original


def test_selection_by_id_lesson_and_file_syntax():
    assert kit.parse_selection("01.1, 02  # lesson two\n10.1") == ["01.1", "02", "10.1"]
    assert kit.select(EXERCISES, ["02", "01.1"]) == ["01.1"] + sorted(e for e in EXERCISES if e.startswith("02."))
    with pytest.raises(kit.KitError, match="unknown exercise '99.9'"):
        kit.select(EXERCISES, ["99.9"])
    with pytest.raises(kit.KitError, match="never closed"):
        kit.find_regions("    # BEGIN EXERCISE 01.1: x\n    pass\n")


def test_full_project_grades_full_marks(tmp_path):
    report = grade.grade(ROOT, ["03.3", "10.1", "13.1"], out=tmp_path / "results.json")
    assert report["score"] == report["extra_data"]["max_score"] == 30
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["score"] == 30 and {t["number"] for t in on_disk["tests"]} == {"03.3", "10.1", "13.1"}
    for t in on_disk["tests"]:
        assert {"name", "score", "max_score", "output"} <= set(t) and t["score"] == t["max_score"]
    assert "total" in grade.table(report)


def _distinctive_lines() -> dict[str, list[str]]:
    """For each exercise, solution lines that appear nowhere else in the project's text files."""
    corpus = []
    for path in [*ROOT.glob("minitune/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("lessons/**/*"),
                 *ROOT.glob("*.md")]:
        if path.is_file() and path.suffix in (".py", ".md", ".json", ".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            for ex_id, ex in EXERCISES.items():
                if path == ROOT / ex["file"]:
                    text = kit.blank(text, [ex_id], EXERCISES)
            corpus.append(text)
    everything = "\n".join(corpus)
    out = {}
    for ex_id, ex in EXERCISES.items():
        lines = kit.solution_lines((ROOT / ex["file"]).read_text(encoding="utf-8"), ex_id)
        out[ex_id] = [ln for ln in lines if len(ln) >= 12 and ln not in everything]
    return out


def test_kit_with_every_exercise_never_contains_a_solution(tmp_path):
    folder, zip_path, ids = kit.build_kit(ROOT, tmp_path, None)
    assert ids == sorted(EXERCISES, key=lambda e: tuple(map(int, e.split("."))))
    distinctive = _distinctive_lines()
    assert all(distinctive.values()), {e: v for e, v in distinctive.items() if not v}
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        zipped = "\n".join(z.read(n).decode("utf-8", errors="replace") for n in names)
    on_disk = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*") if p.is_file())
    for ex_id, lines in distinctive.items():
        for line in lines:
            assert line not in zipped, f"zip holds {ex_id}'s solution line {line!r}"
            assert line not in on_disk, f"kit folder holds {ex_id}'s solution line {line!r}"
        assert f'"Exercise {ex_id}: see {EXERCISES[ex_id]["lesson"]}"' in zipped
    assert all(n.startswith("minitune-student/") for n in names)
    assert not [n for n in names if re.search(r"/(\.git|\.venv|__pycache__|student-kit)/", n)]
    assert "minitune-student/tests/test_lessons_01_03.py" in names and "minitune-student/Makefile" in names
    for f in {EXERCISES[e]["file"] for e in ids}:
        compile((folder / f).read_text(encoding="utf-8"), f, "exec")
    assert json.loads((folder / "lessons/exercises.json").read_text())["assigned"] == ids


def test_student_kit_grades_zero_then_full_marks_after_restoring(tmp_path):
    folder, _, ids = kit.build_kit(ROOT, tmp_path, KIT_SUBSET)
    assert ids == KIT_SUBSET
    # the kit's own minitune is the one imported there, not this project's installed copy
    where = subprocess.run([sys.executable, "-c", "import minitune; print(minitune.__file__)"], cwd=folder,
                           capture_output=True, text=True, env=grade.pytest_env(folder)).stdout
    assert Path(where.strip()).resolve().is_relative_to(folder.resolve()), where

    report = grade.grade(folder, out="grade/results.json")
    by_id = {t["number"]: t for t in report["tests"]}
    assert set(by_id) == set(KIT_SUBSET)  # the kit grades what was assigned
    for ex_id in KIT_SUBSET:
        t = by_id[ex_id]
        assert t["score"] == 0, t
        assert f"Exercise {ex_id}: see {EXERCISES[ex_id]['lesson']}" in t["output"], t["output"]
    assert json.loads((folder / "grade/results.json").read_text())["score"] == 0

    for ex_id in KIT_SUBSET:  # put the reference bodies back from the original files
        f = EXERCISES[ex_id]["file"]
        kit_file = folder / f
        kit_file.write_text(kit.restore(kit_file.read_text(encoding="utf-8"),
                                        (ROOT / f).read_text(encoding="utf-8"), [ex_id]), encoding="utf-8")
    report = grade.grade(folder, out="grade/results.json")
    assert report["score"] == report["extra_data"]["max_score"] == sum(EXERCISES[e]["points"] for e in KIT_SUBSET)
