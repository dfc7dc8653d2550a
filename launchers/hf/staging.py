"""Atomic output directories: everything is written into a hidden sibling, then renamed.

A crash or an error leaves OUT as it was (absent, or the previous export with
``overwrite``), never half written. Files get the umask's usual modes (0644 under umask
022): safetensors writes through a private temporary file (0600), which would keep an
export from the rest of a shared group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from data_tools.atomic import remove, temp_name
from e2d2.errors import UserError


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``: one error before any work starts."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or pick a new path")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; remove it or pick a new path")


@contextlib.contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` when the block succeeds."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_name(out)
    remove(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        remove(stage)
        raise
    _usual_modes(stage)
    if out.exists():  # overwrite: swap, then drop the old one
        old = out.with_name(f".old-{os.getpid()}-{out.name}")
        os.replace(out, old)
        os.replace(stage, out)
        remove(old)
    else:
        os.replace(stage, out)


def _usual_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain ``open``/``mkdir``
    would: 0666 / 0777 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
