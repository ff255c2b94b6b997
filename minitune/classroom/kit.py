"""Student kits: a copy of minitune in which chosen exercise regions are blanked out.

An exercise is a region of the reference code between two comment lines::

    def apply_rope(x, cos, sin):
        \"\"\"docstring stays\"\"\"
        # BEGIN EXERCISE NN.M: title      (NN.M is e.g. 02.2: lesson 02, exercise 2)
        ...reference lines...
        # END EXERCISE      (this line closes the region)

``lessons/exercises.json`` lists every exercise: title, lesson README, file, points and the
pytest node ids that grade it. A kit keeps the two marker lines and puts, at the BEGIN line's
indentation, ``raise NotImplementedError("Exercise 02.2: see lessons/02-transformer/README.md")``
in place of the reference lines. Everything else is copied as it is (no .git, virtual
environments, caches, earlier kits, or weights other than weights/tiny), except the top-level
README.md, which becomes the student's: what to read, what to fill in, how to grade it
(:func:`student_readme`). Then the folder is zipped.

    python -m minitune.classroom.kit [--exercises "01.1 02"] [--exercises-file FILE] [--out student-kit]

An id like ``02`` picks every exercise of lesson 02; no selection means all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

EXERCISES_FILE = "lessons/exercises.json"
KIT_NAME = "minitune-student"
BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN EXERCISE (?P<id>\d\d\.\d+)(?::[ \t]*(?P<title>.*?))?[ \t]*$")
END_RE = re.compile(r"^[ \t]*# END EXERCISE[ \t]*$")

# Never copied into a kit: version control, environments, caches, build output, kits and reports.
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
             ".ipynb_checkpoints"}
SKIP_TOP = {"build", "dist", "runs", "out", "student-kit", "grade"}  # only at the project root
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info", ".zip")
KEEP_WEIGHTS = {"tiny", "README.md", "download.py"}  # weights/* other than these are large checkpoints


class KitError(UserError):
    """A marker or selection problem; the message names the file, line or id."""


@dataclass
class Region:
    id: str
    title: str
    begin: int  # index of the BEGIN line
    end: int  # index of the END line
    indent: str


def find_regions(text: str, where: str = "<text>") -> dict[str, Region]:
    """Every exercise region in a file's text, by id. Nested, unclosed or repeated ids are errors."""
    regions: dict[str, Region] = {}
    open_region = None
    for i, line in enumerate(text.split("\n")):
        m = BEGIN_RE.match(line)
        if m:
            if open_region is not None:
                raise KitError(f"{where}:{i + 1}: exercise {m['id']} begins inside exercise {open_region.id}")
            if m["id"] in regions:
                raise KitError(f"{where}:{i + 1}: exercise {m['id']} is marked twice")
            open_region = Region(m["id"], m["title"] or "", i, -1, m["indent"])
        elif END_RE.match(line):
            if open_region is None:
                raise KitError(f"{where}:{i + 1}: END EXERCISE without a BEGIN")
            open_region.end = i
            regions[open_region.id] = open_region
            open_region = None
    if open_region is not None:
        raise KitError(f"{where}:{open_region.begin + 1}: exercise {open_region.id} is never closed (# END EXERCISE)")
    return regions


def pointer(ex_id: str, exercise: dict) -> str:
    return f"Exercise {ex_id}: see {exercise['lesson']}"


def blank(text: str, ex_ids, exercises: dict, where: str = "<text>") -> str:
    """The text with the body of each listed region replaced by a NotImplementedError pointer."""
    lines = text.split("\n")
    regions = find_regions(text, where)
    for ex_id in sorted(ex_ids, key=lambda e: -regions[e].begin if e in regions else 0):
        if ex_id not in regions:
            raise KitError(f"{where}: no '# BEGIN EXERCISE {ex_id}' marker")
        r = regions[ex_id]
        raise_line = f'{r.indent}raise NotImplementedError("{pointer(ex_id, exercises[ex_id])}")'
        lines[r.begin + 1:r.end] = [raise_line]
    return "\n".join(lines)


def restore(kit_text: str, original_text: str, ex_ids, where: str = "<text>") -> str:
    """Put the reference bodies of ``ex_ids`` from ``original_text`` back into a kit file's text."""
    lines = kit_text.split("\n")
    original = original_text.split("\n")
    ours, theirs = find_regions(kit_text, where), find_regions(original_text, where)
    for ex_id in sorted(ex_ids, key=lambda e: -ours[e].begin):
        r, o = ours[ex_id], theirs[ex_id]
        lines[r.begin + 1:r.end] = original[o.begin + 1:o.end]
    return "\n".join(lines)


def solution_lines(text: str, ex_id: str) -> list[str]:
    """The stripped, non-empty, non-comment lines of one region (what a kit must not contain)."""
    r = find_regions(text)[ex_id]
    body = [ln.strip() for ln in text.split("\n")[r.begin + 1:r.end]]
    return [ln for ln in body if ln and not ln.startswith("#")]


def load_exercises(root: Path) -> dict:
    """``lessons/exercises.json`` as a dict: {"exercises": {id: {...}}, "assigned": [...] in a kit}."""
    path = Path(root) / EXERCISES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KitError(f"{path}: not found (run this from the minitune project root)") from None
    except json.JSONDecodeError as e:
        raise KitError(f"{path}: not valid JSON ({e})") from None
    for ex_id, ex in data.get("exercises", {}).items():
        missing = [k for k in ("title", "lesson", "file", "points", "tests") if k not in ex]
        if missing:
            raise KitError(f"{path}: exercise {ex_id} lacks {missing}")
    return data


def parse_selection(spec: str) -> list[str]:
    """ "01.1, 02  # comment" -> ["01.1", "02"]: ids separated by spaces, commas or new lines."""
    spec = "\n".join(line.split("#", 1)[0] for line in spec.splitlines())
    return [tok for tok in re.split(r"[\s,]+", spec) if tok]


def select(exercises: dict, wanted: list[str] | None) -> list[str]:
    """Expand a selection (``02`` = all of lesson 02) into sorted ids; None or [] = every exercise."""
    known = sorted(exercises)
    if not wanted:
        return known
    out = set()
    for w in wanted:
        hits = [e for e in known if e == w or e.split(".")[0] == w]
        if not hits:
            raise KitError(f"unknown exercise {w!r}; known: {', '.join(known)}")
        out.update(hits)
    return sorted(out, key=lambda e: tuple(map(int, e.split("."))))


def _skip(rel: Path) -> bool:
    parts = rel.parts
    if parts[0] in SKIP_TOP or any(p in SKIP_DIRS or p.endswith(SKIP_SUFFIXES) for p in parts):
        return True
    return len(parts) >= 2 and parts[0] == "weights" and parts[1] not in KEEP_WEIGHTS


def copy_tree(src: Path, dst: Path) -> list[Path]:
    """Copy the project (minus the skipped parts); returns the copied files, relative."""
    copied = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not _skip(here / d))  # prune: never walk .venv
        for name in sorted(filenames):
            rel = here / name
            if _skip(rel) or (src / rel).is_symlink():
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
            copied.append(rel)
    return copied


def student_readme(ids: list[str], exercises: dict) -> str:
    """The kit's README.md: what a student does, lesson by lesson, for the assigned exercises.

    Not the project's README: that one says `make test` is what CI runs, and in a kit the blanked functions
    raise NotImplementedError, so `make test` fails there by design; `make grade` is the measure."""
    lines = ["# minitune: student kit", "",
             "This is minitune with some functions blanked out. For each lesson below:", "",
             "1. read the lesson, `lessons/NN-topic/README.md`, beside the code it links to;",
             "2. fill in each blanked region of the code: it sits between `# BEGIN EXERCISE NN.M` and",
             "   `# END EXERCISE` and now raises `NotImplementedError`; the lesson's Exercises part says what it",
             "   must do;",
             "3. grade it: `make grade-NN` runs that lesson's graded tests and prints your points",
             "   (`make grade` does every lesson and writes `grade/results.json`);",
             "4. run the lesson on your code: `make lesson-NN`; its last line, `claims hold: k/n`, says whether",
             "   your run shows what the lesson's README claims.", "",
             "`make env` creates the environment once (CPU only, no GPU needed). `make test` runs the whole",
             "test suite, and fails here until every blanked function is filled in: grade with `make grade-NN`.", "",
             "The course map is [lessons/README.md](lessons/README.md).", "", "## Your exercises", ""]
    by_lesson: dict[str, list[str]] = {}
    for ex_id in ids:
        by_lesson.setdefault(ex_id.split(".")[0], []).append(ex_id)
    for lesson, lesson_ids in by_lesson.items():
        points = sum(exercises[e]["points"] for e in lesson_ids)
        readme = exercises[lesson_ids[0]]["lesson"]
        lines.append(f"- **Lesson {lesson}** ([{readme}]({readme}), {points} points, `make grade-{lesson}`):")
        lines += [f"  - {e} {exercises[e]['title']} ({exercises[e]['points']} points), in `{exercises[e]['file']}`"
                  for e in lesson_ids]
    return "\n".join(lines) + "\n"


def build_kit(root, out_dir, wanted: list[str] | None = None) -> tuple[Path, Path, list[str]]:
    """Write ``out_dir/minitune-student/`` and ``out_dir/minitune-student.zip``; returns (folder, zip, ids)."""
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    data = load_exercises(root)
    exercises = data["exercises"]
    ids = select(exercises, wanted)
    by_file: dict[str, list[str]] = {}
    for ex_id in ids:
        by_file.setdefault(exercises[ex_id]["file"], []).append(ex_id)
    # Blank everything in memory first, so a bad marker stops us before anything is written.
    blanked = {f: blank((root / f).read_text(encoding="utf-8"), f_ids, exercises, where=f)
               for f, f_ids in by_file.items()}

    folder, zip_path = out_dir / KIT_NAME, out_dir / f"{KIT_NAME}.zip"
    if root == folder or folder in root.parents:
        raise KitError(f"{root} is itself a student kit; build kits from the full project")
    shutil.rmtree(folder, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    files = copy_tree(root, folder)
    for f, text in blanked.items():
        (folder / f).write_text(text, encoding="utf-8")
    (folder / "README.md").write_text(student_readme(ids, exercises), encoding="utf-8")
    if Path("README.md") not in files:
        files.append(Path("README.md"))
    data = dict(data, assigned=ids)
    (folder / EXERCISES_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for rel in files:
            z.write(folder / rel, f"{KIT_NAME}/{rel.as_posix()}")
    return folder, zip_path, ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a student copy of minitune with exercises blanked out.")
    ap.add_argument("--exercises", default="", help='ids or lessons, e.g. "01.1 02.2 10" (default: all)')
    ap.add_argument("--exercises-file", help="a file listing ids (spaces, commas or lines; # comments)")
    ap.add_argument("--out", default="student-kit", help="output folder (default: student-kit)")
    ap.add_argument("--root", default=".", help="the full minitune project (default: .)")
    args = ap.parse_args(argv)
    wanted = parse_selection(args.exercises)
    if args.exercises_file:
        wanted += parse_selection(Path(args.exercises_file).read_text(encoding="utf-8"))
    try:
        folder, zip_path, ids = build_kit(args.root, args.out, wanted)
    except KitError as e:
        print(f"student-kit: {e}", file=sys.stderr)
        return 2
    exercises = load_exercises(Path(args.root))["exercises"]
    print(f"blanked {len(ids)} exercise(s), {sum(exercises[e]['points'] for e in ids)} points:")
    for e in ids:
        print(f"  {e:6} {exercises[e]['title']:48} {exercises[e]['file']}")
    print(f"wrote {folder}/ and {zip_path}")
    print(f"students: cd {KIT_NAME} && make env && make grade   (or make grade-NN for one lesson)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
