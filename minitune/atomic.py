"""Crash-safe folder writes: build the new folder under a temporary name, then rename it into place.

A rename within one file system is atomic, so a reader (or a resumed run) sees either the old
folder or the complete new one, never half of it, whenever the process dies.

A process killed half-way leaves its hidden temporary folder behind: `.NAME.tmp-PID` (the new
folder being written) or `.NAME.old-PID` (the old one, set aside for the instant between two
renames). Neither is ever read back; `leftovers` finds them so the next run can remove them.
"""

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

# .checkpoint-8.tmp-4242, .checkpoint-8.old-4242, .final.tmp-4242 (train/checkpoint.py), .adapter.tmp-4242
# (finetuning.py), and the same again with a second suffix when one of those is itself written atomically
LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+")


def hidden_name(path: Path, kind: str) -> Path:
    """path's hidden sibling for a write in progress: .NAME.tmp-PID (kind "tmp") or .NAME.old-PID ("old")."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def leftovers(folder) -> list[Path]:
    """The temporary folders (or files) that writes in `folder` left behind when their process died."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if LEFTOVER.fullmatch(p.name))


@contextmanager
def atomic_dir(out_dir):
    """with atomic_dir("out/ckpt") as tmp: write files into tmp -> they appear as out/ckpt at the end.

    An existing out_dir is replaced only after the new one is complete; on an exception the
    temporary folder is removed and out_dir is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_name(out_dir, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = hidden_name(out_dir, "old")
        if out_dir.exists():
            out_dir.rename(old)  # old folder aside, new folder in, old folder gone
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
