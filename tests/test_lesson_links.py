"""Every code reference in the lesson text points at something that exists (lessons/README.md
documents the forms): relative links to files, ``file.py:Name`` link texts, ``#L10-L20`` lines."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = sorted([ROOT / "lessons" / "README.md", *ROOT.glob("lessons/*/README.md")])
LINK = re.compile(r"\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
NAME_REF = re.compile(r"^`?(?P<file>[\w./-]+\.py):(?P<name>[A-Za-z_][\w.]*)`?$")
LINES = re.compile(r"^L(?P<a>\d+)(?:-L(?P<b>\d+))?$")


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments, and Class.method / Class.attr, of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{sub.name}")
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        names.add(f"{node.name}.{sub.target.id}")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def references(readme: Path):
    text = re.sub(r"```.*?```", "", readme.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
    text = re.sub(r"``.*?``", "", text)  # nor links shown as inline code (the examples of the forms)
    text = re.sub(r"`[^`\n]+`", lambda m: "" if "](" in m.group() else m.group(), text)
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web links and anchors within the page
        yield m["text"], target


def check(readme: Path) -> list[str]:
    problems = []
    for text, target in references(readme):
        path_part, _, anchor = target.partition("#")
        path = (readme.parent / path_part).resolve()
        where = f"{readme.relative_to(ROOT)}: [{text}]({target})"
        if not path.exists():
            problems.append(f"{where}: {path_part} does not exist")
            continue
        if anchor and (m := LINES.match(anchor)):
            n = len(path.read_text(encoding="utf-8").splitlines())
            a, b = int(m["a"]), int(m["b"] or m["a"])
            if not 1 <= a <= b <= n:
                problems.append(f"{where}: lines {a}-{b} are outside the file's {n} lines")
        ref = NAME_REF.match(text.strip())
        if ref and path.suffix == ".py":
            if not path.name == Path(ref["file"]).name:
                problems.append(f"{where}: the text names {ref['file']} but the link goes to {path.name}")
            elif ref["name"] not in defined_names(path):
                problems.append(f"{where}: {ref['name']} is not defined in {path_part}")
    return problems


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_reference_in_the_lesson_exists(readme):
    assert check(readme) == []


def test_the_lessons_do_reference_code():
    counted = {r.parent.name: sum(1 for _ in references(r)) for r in READMES}
    for lesson in ("01-tokenization", "02-transformer", "03-generation"):
        assert counted[lesson] >= 8, counted


def test_checker_catches_broken_references(tmp_path):
    lesson = tmp_path / "lessons" / "99-x"
    lesson.mkdir(parents=True)
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n        pass\n\ndef g():\n    pass\n")
    readme = lesson / "README.md"
    readme.write_text("[`m.py:A.f`](../../m.py) [`m.py:g`](../../m.py#L5) [ok](../../m.py#L1-L6)\n"
                      "[`m.py:A.h`](../../m.py) [gone](../../nope.py) [far](../../m.py#L7) "
                      "[`other.py:g`](../../m.py) `[shown](../../nope.py)`\n```\n[in code](../../nope.py)\n```\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        problems = check(readme)
    finally:
        ROOT = old
    assert len(problems) == 4, problems
    assert any("A.h is not defined" in p for p in problems)
    assert any("nope.py does not exist" in p for p in problems)
    assert any("outside the file's 6 lines" in p for p in problems)
    assert any("names other.py" in p for p in problems)
