"""Crash-safe folder writes: build the new folder under a temporary name, then rename it into place.

A rename within one file system is atomic, so a reader (or a resumed run) sees either the old
folder or the complete new one, never half of it, whenever the process dies.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out_dir):
    """with atomic_dir("out/ckpt") as tmp: write files into tmp -> they appear as out/ckpt at the end.

    An existing out_dir is replaced only after the new one is complete; on an exception the
    temporary folder is removed and out_dir is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)  # old folder aside, new folder in, old folder gone
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
