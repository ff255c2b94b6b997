"""Claims: what a lesson says it found, checked by the run that found it.

A lesson's README states its findings ("SFT lifts held-out exact match by at least 30 points"); its
run.py states the same findings as claims, each a comparison of measured numbers with a margin:

    claim(text, holds = measured_after - measured_before >= 0.30, measured = "0% -> 50%")

and :func:`report` prints every claim with PASS / FAIL and what was measured, then exactly one line

    claims hold: k/n

(the failed ones named). The margins are chosen from the range measured across seeds, thread counts
and CPU models (the README gives that range), because a tiny model trained for a minute is sensitive to
the last bits of its arithmetic: a different CPU rounds differently, and the exact figures move. A claim
that fails on your machine is a finding too: the README's text then disagrees with your run.

In ``--fast`` mode a few training steps cannot show what a full run shows, so claims about training
are recorded as "not checked" (holds=None) and only the structural ones (parameter counts, formats) are
checked. The run exits 1 when a checked claim fails on the model the claims describe (weights/tiny);
``make check-lessons`` relies on that.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "weights" / "tiny"  # the claims describe this model; another one is not held to them


@dataclass
class Claim:
    text: str
    holds: bool | None  # None: not checked (a training claim in --fast mode)
    measured: str


_claims: list[Claim] = []


def claim(text: str, holds: bool | None, measured: str = "") -> bool | None:
    """Record one claim: ``holds`` is the comparison's outcome (None: not checked in this mode)."""
    _claims.append(Claim(text, None if holds is None else bool(holds), measured))
    return holds


def not_checked(texts: list[str]) -> None:
    """Record claims that this mode (``--fast``: a few training steps) cannot check."""
    for text in texts:
        claim(text, None)


def results() -> list[Claim]:
    return list(_claims)


def reset() -> None:
    """Forget the recorded claims (for tests that use this module twice in one process)."""
    _claims.clear()


def summary(claims: list[Claim], fast: bool) -> str:
    """The one closing line: ``claims hold: k/n``, what failed, and what this mode left unchecked."""
    checked = [c for c in claims if c.holds is not None]
    failed = [i + 1 for i, c in enumerate(claims) if c.holds is False]
    line = f"claims hold: {sum(c.holds for c in checked)}/{len(checked)}"
    notes = []
    if failed:
        notes.append("failed: " + ", ".join(f"#{i}" for i in failed))
    skipped = len(claims) - len(checked)
    if skipped:
        mode = "fast mode" if fast else "this run"
        notes.append(f"{mode}: {skipped} claim{'s' if skipped != 1 else ''} not checked")
    return line + (f" ({'; '.join(notes)})" if notes else "")


def report(fast: bool, model: str | Path | None = None) -> int:
    """Print every claim and the closing line; return the exit code the lesson should end with.

    1 when a checked claim failed on the tiny model (``model`` None or weights/tiny); with another
    model the claims are printed for comparison but do not fail the run (they describe weights/tiny)."""
    claims = results()
    print(f"\n{'-' * 78}\nclaims (what the README says this run shows; each with what was measured):")
    for i, c in enumerate(claims, 1):
        verdict = {True: "PASS", False: "FAIL", None: "----"}[c.holds]
        detail = c.measured if c.holds is not None else ("not checked in --fast mode" if fast else "not checked")
        print(f"  {verdict} #{i} {c.text}\n{'':11}measured: {detail}")
    held_to = model is None or Path(model).resolve() == TINY.resolve()
    if not held_to:
        print(f"  (these claims describe {TINY.relative_to(ROOT)}; {model} is not held to them)")
    print(summary(claims, fast))
    return 1 if held_to and any(c.holds is False for c in claims) else 0


def finish_claims(fast: bool, model: str | Path | None = None) -> None:
    """:func:`report`, then exit 1 if it says so (the lesson's last call)."""
    code = report(fast, model)
    sys.stdout.flush()
    if code:
        sys.exit(code)
