"""Run chosen lessons over seeds x thread counts, check their claims, and write the figures as markdown.

    python lessons/check_claims.py --lessons 05 10 --seeds 0 1 2 --threads 1 2 --out runs/claims.md
    python lessons/check_claims.py --lessons 05 --from-logs runs/check-claims   # tables from earlier logs only

Every lesson's run.py ends with its claims (minitune/classroom/claims.py): each claim with PASS / FAIL and
what was measured, then `claims hold: k/n`. This script runs `run.py --seed S --threads T` for every
combination, one at a time (the runs are timed and share the CPU), keeps each log as
LOGS/NN-sS-tT.log, and writes one table per lesson: a row per claim, a column per run, each cell the
measured figures. The machine is named above the tables (CPU model, torch version), so that figures from
different machines can be put side by side. Exit status 1 when a claim failed or a run stopped.
"""
from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAIM = re.compile(r"^  (PASS|FAIL|----) #(\d+) (.*)$")
MEASURED = re.compile(r"^ +measured: (.*)$")
SUMMARY = re.compile(r"^claims hold: (\d+)/(\d+)")


def cpu_model() -> str:
    """`lscpu`'s model name (Linux), else what the platform module knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def lesson_dir(lesson: str) -> Path:
    found = sorted(ROOT.glob(f"lessons/{lesson}-*/run.py"))
    if not found:
        raise SystemExit(f"no lesson {lesson} (lessons/{lesson}-*/run.py)")
    return found[0].parent


def parse(text: str) -> dict:
    """{"claims": [(verdict, number, text, measured)], "summary": "k/n" or None} from a lesson's output."""
    claims, summary = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = CLAIM.match(line)
        if m:
            nxt = MEASURED.match(lines[i + 1]) if i + 1 < len(lines) else None
            claims.append((m.group(1), int(m.group(2)), m.group(3), nxt.group(1) if nxt else ""))
        s = SUMMARY.match(line)
        if s:
            summary = f"{s.group(1)}/{s.group(2)}"
    return {"claims": claims, "summary": summary}


def run_one(lesson: str, seed: int, threads: int, logs: Path, extra: list[str]) -> tuple[str, float, int]:
    """Run one lesson in full; (its output, wall seconds, exit status). The log is kept in ``logs``."""
    folder = lesson_dir(lesson)
    cmd = [sys.executable, str(folder / "run.py"), "--seed", str(seed), "--threads", str(threads), *extra]
    if "--out" in (folder / "run.py").read_text(encoding="utf-8"):  # keep each run's files apart
        cmd += ["--out", str(logs / "out" / f"{lesson}-s{seed}-t{threads}")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - start
    text = proc.stdout + ("\n" + proc.stderr[-3000:] if proc.returncode not in (0, 1) else "")
    (logs / f"{lesson}-s{seed}-t{threads}.log").write_text(f"# rc={proc.returncode} wall={took:.0f}s\n" + text,
                                                          encoding="utf-8")
    return text, took, proc.returncode


def table(lesson: str, runs: dict) -> list[str]:
    """Markdown lines: a row per claim, a column per (seed, threads) run, cells = measured figures."""
    keys = sorted(runs)
    out = [f"### lesson {lesson}", "",
           "| claim | " + " | ".join(f"seed {s}, {t} thread{'s' if t != 1 else ''}" for s, t in keys) + " |",
           "|---|" + "---|" * len(keys)]
    first = next((runs[k]["claims"] for k in keys if runs[k]["claims"]), [])
    for _, number, text, _ in first:
        cells = []
        for k in keys:
            hit = [c for c in runs[k]["claims"] if c[1] == number]
            if not hit:
                cells.append("(no output)")
                continue
            verdict, _, _, measured = hit[0]
            mark = {"PASS": "", "FAIL": "**FAIL** ", "----": "not checked "}[verdict]
            cells.append(mark + measured.replace("|", "\\|"))
        out.append(f"| {number}. {text.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    out.append("| **claims hold** | " + " | ".join(runs[k]["summary"] or "(run stopped)" for k in keys) + " |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lessons", nargs="+", default=["05", "06", "09", "10", "11", "12", "13"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--logs", default=str(ROOT / "runs" / "check-claims"), help="where the runs' logs go")
    ap.add_argument("--from-logs", default=None, metavar="DIR",
                    help="run nothing: read DIR/NN-sS-tT.log files written earlier (missing ones are left out)")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every run.py")
    args = ap.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    logs = Path(args.from_logs or args.logs)
    logs.mkdir(parents=True, exist_ok=True)

    md = [f"Machine: {cpu_model()}, torch {torch_version()}, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}.", ""]
    bad = False
    for lesson in args.lessons:
        runs = {}
        for seed in args.seeds:
            for threads in args.threads:
                log = logs / f"{lesson}-s{seed}-t{threads}.log"
                if args.from_logs:
                    if not log.is_file():
                        continue
                    text, rc = log.read_text(encoding="utf-8", errors="replace"), 0
                else:
                    print(f"lesson {lesson}, seed {seed}, {threads} thread(s) ...", flush=True)
                    text, took, rc = run_one(lesson, seed, threads, logs, extra)
                    print(f"  {took:.0f} s, exit {rc}", flush=True)
                runs[seed, threads] = parse(text)
                failed = [c for c in runs[seed, threads]["claims"] if c[0] == "FAIL"]
                bad |= bool(failed) or rc != 0 or runs[seed, threads]["summary"] is None
        if runs:
            md += table(lesson, runs)
    text = "\n".join(md)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
