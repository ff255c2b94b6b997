"""Multiple-choice benchmarks as their authors lay them out on disk: MMLU, CMMLU, C-Eval.

Each is a folder of per-subject CSV files, one folder per split; every row is a question, its four
options and the answer letter. The three differ only in file names and headers:

    mmlu/data/{dev,val,test}/SUBJECT_SPLIT.csv    no header: question,A,B,C,D,answer
    ceval/{dev,val,test}/SUBJECT_SPLIT.csv        header: id,question,A,B,C,D,answer[,explanation]
    cmmlu/{dev,test}/SUBJECT.csv                  header: (index),Question,A,B,C,D,Answer

(MMLU, Hendrycks et al. 2021, arXiv:2009.03300; C-Eval, Huang et al. 2023, arXiv:2305.08322; CMMLU,
Li et al. 2023, arXiv:2306.09212.) LLaMA-Factory ships them this way under `evaluation/NAME/`, with a
`mapping.json` that gives each subject its display name and category ({"abstract_algebra":
{"name": "abstract algebra", "category": "STEM"}}). It names a task NAME_SPLIT (`mmlu_test`,
`ceval_validation`, `cmmlu_test`), the split as `datasets` calls it; `dev` is where few-shot
examples come from. A folder without mapping.json works too: its subjects are its file names.

Rows are read with Python's csv module; nothing in a data file is executed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

LETTERS = ("A", "B", "C", "D")
FIELDS = ("question", *LETTERS, "answer")
# the split as LLaMA-Factory's task name spells it (datasets' names) -> the folder it lives in
NO_ANSWERS = "; C-Eval keeps its test answers private: evaluate ceval_validation"
SPLIT_FOLDERS = {"test": "test", "validation": "val", "val": "val", "dev": "dev", "train": "dev"}


class BenchmarkError(UserError):
    """A benchmark folder or CSV row minitune cannot read; names the file (and line)."""


@dataclass
class Question:
    question: str
    choices: list[str]  # the texts of options A, B, C, D
    answer: str  # "A".."D"
    where: str = ""  # "file:line", for messages

    @property
    def label(self) -> int:
        return LETTERS.index(self.answer)


@dataclass
class Subject:
    name: str  # the file name's subject part: "abstract_algebra"
    title: str  # how prompts name it: "abstract algebra"
    category: str | None  # mapping.json's category ("STEM", ...), None without one
    questions: list[Question]
    dev: list[Question] = field(default_factory=list)  # few-shot examples
    dev_file: str = ""


def split_task(task: str, split: str | None = None) -> tuple[str, str]:
    """'mmlu_test' -> ('mmlu', 'test'); a task without a split takes `split` (default test)."""
    name, _, suffix = task.rpartition("_")
    if name and suffix in SPLIT_FOLDERS:
        if split and SPLIT_FOLDERS[split] != SPLIT_FOLDERS[suffix]:
            raise BenchmarkError(f"task {task!r} names split {suffix!r}, but split is {split!r} (give one)")
        return name, suffix
    split = split or "test"
    if split not in SPLIT_FOLDERS:
        raise BenchmarkError(f"split {split!r}: expected one of {', '.join(SPLIT_FOLDERS)}")
    return task, split


def read_rows(path: Path) -> list[Question]:
    """The questions of one CSV file, header or not (see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first cell
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, line = [], 1  # line: where the record about to be read starts (a quoted cell may span lines)
    try:
        for cells in reader:
            rows.append((line, cells))
            line = reader.line_num + 1
    except csv.Error as e:
        raise BenchmarkError(f"{path}:{line}: not a CSV row ({e})") from None
    rows = [(n, cells) for n, cells in rows if any(c.strip() for c in cells)]
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    header = [c.strip().lower() for c in rows[0][1]]
    hint = NO_ANSWERS if path.parent.name == "test" else ""  # a test split without answers: C-Eval's
    named = "question" in header or "answer" in header
    if named:  # CMMLU / C-Eval: find columns by name
        missing = [f for f in FIELDS if f.lower() not in header]
        if missing:
            raise BenchmarkError(f"{path}:{rows[0][0]}: header has no column {', '.join(missing)} "
                                 f"(expected question, A, B, C, D, answer{hint})")
        index = {f: header.index(f.lower()) for f in FIELDS}
        rows = rows[1:]
    else:  # MMLU: exactly six cells, in order
        index = {f: i for i, f in enumerate(FIELDS)}
    out = []
    for n, cells in rows:
        where = f"{path}:{n}"
        if len(cells) <= max(index.values()) or (not named and len(cells) != len(FIELDS)):
            raise BenchmarkError(f"{where}: {len(cells)} cells, expected {max(index.values()) + 1} "
                                 f"(question, A, B, C, D, answer)")
        answer = cells[index["answer"]].strip().upper()
        if answer not in LETTERS:
            raise BenchmarkError(f"{where}: answer {cells[index['answer']]!r} (expected one of A, B, C, D"
                                 f"{hint if not answer else ''})")
        out.append(Question(cells[index["question"]], [cells[index[c]] for c in LETTERS], answer, where))
    return out


def subject_files(folder: Path, split: str) -> dict[str, Path]:
    """{subject: csv path} in folder/SPLIT/ (MMLU also: folder/data/SPLIT/); names lose their _SPLIT."""
    for base in (folder / "data", folder):
        split_dir = base / SPLIT_FOLDERS[split]
        if split_dir.is_dir():
            suffix = f"_{SPLIT_FOLDERS[split]}"
            return {p.stem.removesuffix(suffix): p for p in sorted(split_dir.glob("*.csv"))}
    raise BenchmarkError(f"{folder}: no {SPLIT_FOLDERS[split]}/ folder of CSV files "
                         f"(expected {folder}/{SPLIT_FOLDERS[split]}/SUBJECT_{SPLIT_FOLDERS[split]}.csv)")


def read_mapping(folder: Path) -> dict:
    path = folder / "mapping.json"
    if not path.exists():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise BenchmarkError(f"{path}: expected {{subject: {{\"name\": ..., \"category\": ...}}}}")
    return mapping


def load_benchmark(task_dir, task: str, split: str | None = None, n_shot: int = 0) -> list[Subject]:
    """The subjects of TASK_DIR/NAME for a task like 'mmlu_test', each with its dev split if it has one.

    n_shot > 0 needs a dev file per subject holding at least n_shot rows.
    """
    name, split = split_task(task, split)
    folder = Path(task_dir) / name
    if not folder.is_dir():
        raise BenchmarkError(f"{folder}: no such folder (task_dir {task_dir!r} + task {name!r}; "
                             f"expected e.g. {Path(task_dir) / 'mmlu'}/data/test/*.csv)")
    mapping = read_mapping(folder)
    files = subject_files(folder, split)
    if not files:
        raise BenchmarkError(f"{folder}: no CSV files for split {split!r}")
    dev_files = subject_files(folder, "dev") if n_shot > 0 else {}
    subjects = []
    for subject, path in files.items():
        questions = read_rows(path)
        info = mapping.get(subject, {})
        dev = []
        if n_shot > 0:
            if subject not in dev_files:
                raise BenchmarkError(f"{path}: n_shot {n_shot} needs few-shot examples, but there is no dev file "
                                     f"for {subject!r} (expected in {folder}/.../dev/)")
            dev = read_rows(dev_files[subject])
            if len(dev) < n_shot:
                raise BenchmarkError(f"{dev_files[subject]}: n_shot is {n_shot} but this dev split has only "
                                     f"{len(dev)} rows (lower n_shot to at most {len(dev)})")
        subjects.append(Subject(subject, str(info.get("name", subject.replace("_", " "))), info.get("category"),
                                questions, dev, str(dev_files.get(subject, ""))))
    return subjects
