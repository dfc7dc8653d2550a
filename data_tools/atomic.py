"""Atomic file creation: write under a temporary name in the same directory, then rename.

A crash or Ctrl-C leaves only a ``.tmp-*`` file behind, never a file that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: str | Path) -> Path:
    """A sibling of ``path`` that no other process writing ``path`` would pick."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    os.replace(tmp, path)


def remove(path: str | Path) -> None:
    """Delete a file or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
