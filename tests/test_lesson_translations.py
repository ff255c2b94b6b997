"""The Chinese course (``README.zh.md`` beside every lesson README) stays in step with the English.

Prose is translated freely, but what a reader checks against the code and the output must agree:
the headings (count, levels, order, and the ``## N.`` numbers that match run.py's sections), the
relative code links (each one checked as tests/test_lesson_links.py checks the English), the numbers
in the markdown tables, the exercise ids, and the fenced code blocks (code stays English; only its
``#`` comments may be translated). The two files link to each other on their first line:
``[中文](README.zh.md)`` in English, ``[English](README.md)`` in Chinese.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from test_lesson_links import check, references  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
ENGLISH = sorted([ROOT / "lessons" / "README.md", *ROOT.glob("lessons/[0-9][0-9]-*/README.md")])
TO_CHINESE = "[中文](README.zh.md)"
TO_ENGLISH = "[English](README.md)"
FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^(#{1,6}) (.*)$")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def chinese(readme: Path) -> Path:
    return readme.with_name("README.zh.md")


def split(text: str) -> tuple[list[str], list[list[str]]]:
    """The lines outside fenced code blocks, and each code block's lines (fences included)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if block is None and FENCE.match(line):
            block = [line]
        elif block is not None:
            block.append(line)
            if FENCE.match(line):
                blocks.append(block)
                block = None
        else:
            prose.append(line)
    if block is not None:
        blocks.append(block)  # an unclosed block: compared as it is
    return prose, blocks


def headings(text: str) -> list[tuple[int, int | None]]:
    """(level, N) of each heading in order; N is the number of an ``## N. Title`` heading, else None."""
    out = []
    for line in split(text)[0]:
        if m := HEADING.match(line):
            number = re.match(r"(\d+)\. ", m[2])
            out.append((len(m[1]), int(number[1]) if number else None))
    return out


def table_numbers(text: str) -> Counter:
    """The multiset of numbers in markdown table rows (link targets left out: the links are compared apart)."""
    numbers = Counter()
    for line in split(text)[0]:
        if line.lstrip().startswith("|") and not re.fullmatch(r"[\s|:-]+", line):
            numbers.update(NUMBER.findall(re.sub(r"\]\([^)]*\)", "]", line)))
    return numbers


def uncommented(line: str) -> str | None:
    """A code line without its ``#`` comment (None for a comment-only line): comments may be translated."""
    if line.lstrip().startswith("#"):
        return None
    return re.sub(r"\s+#.*$", "", line).rstrip()


def code_blocks(text: str) -> list[list[str]]:
    return [[c for c in map(uncommented, block) if c is not None] for block in split(text)[1]]


def code_links(readme: Path) -> set[str]:
    """Targets of the relative links (web links, anchors and the language link left out). A Chinese
    page may point at the Chinese version of another lesson: ``X/README.zh.md`` counts as ``X/README.md``."""
    targets = {re.sub(r"README\.zh\.md(?=$|#)", "README.md", t) for _, t in references(readme)
               if t not in ("README.md", "README.zh.md")}
    return targets


def exercise_ids(readme: Path) -> set[str]:
    data = json.loads((ROOT / "lessons" / "exercises.json").read_text(encoding="utf-8"))
    lesson = readme.relative_to(ROOT).as_posix()
    return {ex_id for ex_id, ex in data["exercises"].items() if ex["lesson"] == lesson}


def name(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_every_english_lesson_readme_is_found():
    assert len(ENGLISH) >= 14 and ENGLISH[0] == ROOT / "lessons" / "01-tokenization" / "README.md", ENGLISH


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_every_lesson_readme_has_a_chinese_translation(readme):
    assert chinese(readme).is_file(), f"{name(readme)} has no {chinese(readme).name} beside it"


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_each_readme_links_to_the_other_on_its_first_line(readme):
    zh = chinese(readme)
    assert readme.read_text(encoding="utf-8").splitlines()[0] == TO_CHINESE, f"{name(readme)}:1: expected {TO_CHINESE}"
    if zh.is_file():
        assert zh.read_text(encoding="utf-8").splitlines()[0] == TO_ENGLISH, f"{name(zh)}:1: expected {TO_ENGLISH}"


def translation(readme: Path) -> tuple[str, str]:
    zh = chinese(readme)
    if not zh.is_file():
        pytest.fail(f"{name(readme)} has no {zh.name} beside it")
    return readme.read_text(encoding="utf-8"), zh.read_text(encoding="utf-8")


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_translation_has_the_same_headings_in_the_same_order(readme):
    en, zh = translation(readme)
    assert headings(zh) == headings(en), f"{name(chinese(readme))}: headings (level, N) differ from the English"


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_translation_links_the_same_code_and_every_link_exists(readme):
    translation(readme)
    zh = chinese(readme)
    en_links, zh_links = code_links(readme), code_links(zh)
    assert zh_links == en_links, (f"{name(zh)}: only in the Chinese {sorted(zh_links - en_links)}, "
                                  f"only in the English {sorted(en_links - zh_links)}")
    assert check(zh) == []


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_translation_tables_hold_the_same_numbers(readme):
    en, zh = translation(readme)
    a, b = table_numbers(en), table_numbers(zh)
    assert a == b, (f"{name(chinese(readme))}: table numbers only in the Chinese {dict(b - a)}, "
                    f"only in the English {dict(a - b)}")


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_translation_keeps_the_code_blocks_in_english(readme):
    en, zh = translation(readme)
    a, b = code_blocks(en), code_blocks(zh)
    assert len(a) == len(b), f"{name(chinese(readme))}: {len(b)} code blocks, the English has {len(a)}"
    for i, (x, y) in enumerate(zip(a, b), 1):
        assert y == x, f"{name(chinese(readme))}: code block {i} differs from the English (beyond # comments)"


@pytest.mark.parametrize("readme", ENGLISH, ids=name)
def test_translation_names_the_same_exercises(readme):
    _, zh = translation(readme)
    missing = sorted(i for i in exercise_ids(readme) if i not in zh)
    assert not missing, f"{name(chinese(readme))}: exercises {missing} are not mentioned"


def test_checks_catch_a_drifted_translation():
    en = "# T\n\n## 1. A\n\n| a | b |\n|---|---|\n| [x](f.py) | 50.4% |\n\n```python\nx = 1  # one\n# note\n```\n"
    same = "# T\n\n## 1. 甲\n\n| 甲 | 乙 |\n|---|---|\n| [x](f.py) | 50.4% |\n\n```python\nx = 1  # 一\n```\n"
    drift = "# T\n\n### 1. 甲\n\n| 甲 | 乙 |\n|---|---|\n| [x](g.py) | 50.5% |\n\n```python\nx = 2\n```\n"
    assert headings(same) == headings(en) != headings(drift)
    assert table_numbers(same) == table_numbers(en) != table_numbers(drift)
    assert code_blocks(same) == code_blocks(en) != code_blocks(drift)
