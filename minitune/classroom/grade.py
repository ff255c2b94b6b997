"""Grade the exercises: run each exercise's tests with pytest, print a table, write results.json.

    python -m minitune.classroom.grade                # every assigned exercise (all, in the full project)
    python -m minitune.classroom.grade --lesson 02    # only lesson 02's
    python -m minitune.classroom.grade --exercises "01.1 03"

All graded tests run in one pytest process (startup once); its JUnit XML report is read back
and each test is credited to every exercise that lists it. An exercise earns
``points * passed / total`` of its tests; a skipped or never-run test counts as not passed.
The report has the shape Gradescope reads from ``results.json``::

    {"score": 130.0, "execution_time": 41.2, "extra_data": {"max_score": 150, "exercises": [...]},
     "tests": [{"name", "number", "score", "max_score", "status", "output", "extra_data"}, ...]}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .kit import KitError, load_exercises, parse_selection, select


def _nodeid(case: ET.Element) -> str:
    """pytest node id of one JUnit <testcase> (xunit1 reports carry the file)."""
    file, classname, name = case.get("file", ""), case.get("classname", ""), case.get("name", "")
    module = file[:-3].replace("/", ".") if file.endswith(".py") else ""
    inner = classname[len(module) + 1:].split(".") if module and classname.startswith(module + ".") else []
    return "::".join([file, *[p for p in inner if p], name])


def _matches(spec: str, nodeid: str) -> bool:
    """A spec names a file, a test (all its parameters) or one parametrized case."""
    return nodeid == spec or nodeid.startswith(spec + "[") or nodeid.startswith(spec + "::")


def pytest_env(root: Path) -> dict:
    """The environment for graded runs: ``root`` first on the path, so the code graded is the copy
    in ``root`` (a student kit) even where another minitune is installed in the environment."""
    path = os.pathsep.join([str(Path(root).resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")


def run_pytest(root: Path, specs: list[str], timeout: float = 1800) -> tuple[dict[str, tuple[str, str]], str]:
    """Run the node ids; returns ({nodeid: (outcome, message)}, pytest's console tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", "-rN",
               "-o", "junit_family=xunit1", f"--junitxml={xml_path}", *specs]
        env = pytest_env(root)
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
            console = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            console = f"pytest did not finish within {timeout:.0f} s\n{e.stdout or ''}"
        results: dict[str, tuple[str, str]] = {}
        if not xml_path.exists():
            return results, console
        for case in ET.parse(xml_path).iter("testcase"):
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                    message = (el.get("message") or el.text or "").strip()
                    break
            node = _nodeid(case)
            if outcome == "error" and not case.get("file"):  # a file that failed to import
                node = case.get("classname", "").replace(".", "/") + ".py"
            results[node] = (outcome, message)
    return results, console


def _short(message: str, limit: int = 300) -> str:
    lines = [ln for ln in message.splitlines() if ln.strip()]
    # pytest's messages end with the exception line, which holds the exercise pointer
    text = next((ln for ln in lines if "NotImplementedError" in ln), lines[0] if lines else "")
    return text if len(text) <= limit else text[:limit] + "..."


def grade(root=".", wanted: list[str] | None = None, lesson: str | None = None,
          out: str | Path | None = "grade/results.json", timeout: float = 1800) -> dict:
    """Grade and return the results dict (also written to ``out`` unless it is None)."""
    root = Path(root).resolve()
    data = load_exercises(root)
    exercises = data["exercises"]
    if wanted:
        ids = select(exercises, wanted)
    else:
        ids = select(exercises, data.get("assigned"))  # a kit lists what was handed out
    if lesson:
        ids = [e for e in ids if e.split(".")[0] == lesson.zfill(2)]
        if not ids:
            raise KitError(f"no exercises for lesson {lesson!r}")
    specs = list(dict.fromkeys(t for e in ids for t in exercises[e]["tests"]))
    start = time.time()
    results, console = run_pytest(root, specs, timeout)

    tests, total = [], 0.0
    for e in ids:
        ex = exercises[e]
        lines, passed, count = [], 0, 0
        for spec in ex["tests"]:
            hits = {n: r for n, r in results.items() if _matches(spec, n)}
            if not hits:
                broken = next((r for n, r in results.items() if spec.startswith(n) and r[0] == "error"), None)
                why = f"collection error: {_short(broken[1])}" if broken else "no result (not collected)"
                hits = {spec: ("failed", why)}
            for node, (outcome, message) in hits.items():
                count += 1
                passed += outcome == "passed"
                lines.append(f"PASS {node}" if outcome == "passed" else f"{outcome.upper()} {node}: {_short(message)}")
        score = round(ex["points"] * passed / count, 2) if count else 0.0
        total += score
        tests.append({"name": f"{e} {ex['title']}", "number": e, "score": score, "max_score": ex["points"],
                      "status": "passed" if count and passed == count else "failed",
                      "output": f"{passed}/{count} tests passed\n" + "\n".join(lines),
                      "extra_data": {"passed": passed, "tests": count, "lesson": ex["lesson"]}})
    report = {"score": round(total, 2), "execution_time": round(time.time() - start, 1), "tests": tests,
              "extra_data": {"max_score": sum(exercises[e]["points"] for e in ids), "exercises": ids}}
    if not results:
        report["output"] = "pytest produced no report:\n" + console[-3000:]
    if out is not None:
        out = Path(out) if Path(out).is_absolute() else root / out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def table(report: dict) -> str:
    """The report as a plain-text table, failures listed under it."""
    rows = [f"{'exercise':<58} {'points':>13}  tests"]
    for t in report["tests"]:
        x = t["extra_data"]
        rows.append(f"{t['name'][:58]:<58} {t['score']:>6g} / {t['max_score']:<4g}  {x['passed']}/{x['tests']}")
    rows.append(f"{'total':<58} {report['score']:>6g} / {report['extra_data']['max_score']:<4g}")
    failures = [(t["name"], ln) for t in report["tests"] for ln in t["output"].splitlines()[1:]
                if not ln.startswith("PASS")]
    if failures:
        rows += ["", "failures:"] + [f"  [{name.split()[0]}] {ln}" for name, ln in failures]
    if "output" in report:
        rows += ["", report["output"]]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the graded tests of minitune's exercises.")
    ap.add_argument("--exercises", default="", help='ids or lessons, e.g. "01.1 02" (default: the assigned ones)')
    ap.add_argument("--lesson", help="only this lesson's exercises, e.g. 02")
    ap.add_argument("--out", default="grade/results.json", help="where to write the Gradescope-style report")
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    try:
        report = grade(args.root, parse_selection(args.exercises), args.lesson, args.out)
    except KitError as e:
        print(f"grade: {e}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"\nreport written to {args.out} ({report['execution_time']} s)")
    return 0 if "output" not in report else 1  # 1 only when pytest itself could not run


if __name__ == "__main__":
    sys.exit(main())
