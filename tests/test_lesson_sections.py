"""Each lesson's README is the textbook and its run.py the measurements: they number their parts alike.

The README's numbered headings (``## 3. Title``; ``## Exercises``, ``## Measured`` and other headings
without a number are not sections) and run.py's ``section("3. title")`` calls are numbered 1..k, one to
one and in the same order, so "section 3 of the output" is what "## 3." of the text explains. Read
statically (ast), so these tests take no time; the tests that already run a lesson with ``--fast``
also check the printed section titles with :func:`assert_sections_printed`.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted(p.parent.name for p in ROOT.glob("lessons/[0-9][0-9]-*/run.py"))
HEADING = re.compile(r"^## (\d+)\. (.+)$", re.M)
BAR = "=" * 78  # minitune.classroom.lesson.section prints the title between two such lines


def readme_sections(lesson: str) -> list[int]:
    """The numbers of the README's ``## N. Title`` headings, in order (code blocks left out)."""
    text = (ROOT / "lessons" / lesson / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [int(n) for n, _ in HEADING.findall(text)]


def _leading_text(node: ast.expr) -> str | None:
    """The literal start of a string argument: a plain string, or an f-string's first literal part."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def run_sections(lesson: str) -> list[int]:
    """The numbers of run.py's ``section("N. ...")`` / ``S.section(f"N. ...")`` calls, in source order."""
    tree = ast.parse((ROOT / "lessons" / lesson / "run.py").read_text(encoding="utf-8"))
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            text = _leading_text(node.args[0]) if name == "section" else None
            if text is not None:
                m = re.match(r"(\d+)\. ", text)
                assert m, f"lessons/{lesson}/run.py:{node.lineno}: section title {text!r} does not start with 'N. '"
                calls.append((node.lineno, node.col_offset, int(m.group(1))))
    return [n for _, _, n in sorted(calls)]


def printed_sections(stdout: str) -> list[int]:
    """The numbers of the section titles a lesson printed (each title sits between two bars)."""
    lines = stdout.splitlines()
    titles = [lines[i] for i in range(1, len(lines) - 1) if lines[i - 1] == BAR and lines[i + 1] == BAR]
    return [int(m.group(1)) for t in titles if (m := re.match(r"(\d+)\. ", t))]


def assert_sections_printed(lesson: str, stdout: str) -> None:
    """For the tests that run a lesson: its output has the README's sections, numbered alike."""
    assert printed_sections(stdout) == readme_sections(lesson), (
        f"lessons/{lesson}/run.py printed sections {printed_sections(stdout)}, its README has "
        f"{readme_sections(lesson)}")


def test_every_lesson_is_found():
    assert len(LESSONS) == 14 and LESSONS[0] == "01-tokenization" and LESSONS[-1] == "14-parallelism", LESSONS


@pytest.mark.parametrize("lesson", LESSONS)
def test_readme_headings_are_numbered_1_to_k(lesson):
    numbers = readme_sections(lesson)
    assert numbers and numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("lesson", LESSONS)
def test_run_py_sections_match_the_readme_headings(lesson):
    assert run_sections(lesson) == readme_sections(lesson), (
        f"lessons/{lesson}: run.py sections {run_sections(lesson)}, README headings {readme_sections(lesson)}")


def builds(func: ast.expr) -> bool:
    """A call that only builds a value: a class (ModelConfig(...)), a builtin container, dict.items()."""
    if isinstance(func, ast.Name):
        return func.id[0].isupper() or func.id in ("dict", "list", "tuple", "set", "frozenset", "range")
    return isinstance(func, ast.Attribute) and func.attr in ("items", "keys", "values")


@pytest.mark.parametrize("lesson", LESSONS)
def test_run_py_does_its_work_in_main(lesson):
    """Imports, constants and definitions at module level; the work starts from main()."""
    path = ROOT / "lessons" / lesson / "run.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    for node in tree.body[1:] if ast.get_docstring(tree) else tree.body:
        if isinstance(node, ast.If):  # if __name__ == "__main__": main()
            assert ast.unparse(node.test) == "__name__ == '__main__'", ast.unparse(node.test)
            assert [ast.unparse(s) for s in node.body] == ["main()"], ast.unparse(node)
            continue
        assert isinstance(node, kinds), f"{path.relative_to(ROOT)}:{node.lineno}: module-level {ast.unparse(node)!r}"
        if isinstance(node, (ast.Assign, ast.AnnAssign)):  # a constant: at most it builds a value
            work = [ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call) and not builds(c.func)]
            assert not work, f"{path.relative_to(ROOT)}:{node.lineno}: a constant that calls {work} at import"
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{path} has no main()"
    assert "sys.path" not in path.read_text(encoding="utf-8"), f"{path}: import shared code as a module"


def test_printed_sections_are_parsed():
    out = f"intro\n\n{BAR}\n1. first (第一)\n{BAR}\ntext\n{BAR}\n2. second\n{BAR}\n{BAR}\n"
    assert printed_sections(out) == [1, 2]
