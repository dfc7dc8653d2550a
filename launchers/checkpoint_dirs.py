"""Where a run's checkpoints are: ``RUN/checkpoints/iter_NNNNNNN/`` directories, the
``latest`` file that names the newest complete one, and ``abandoned/``
(`launchers.checkpointing` writes and prunes them). A path given on the command line (a run
directory, its ``checkpoints`` directory or an iteration directory) resolves here, without
torch, so that a wrong path is one message at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from e2d2.errors import UserError
from launchers.config import RunConfig, load_run_config

ITER_DIR = re.compile(r"^iter_(\d{7,})$")
LATEST = "latest"
ABANDONED = "abandoned"


def iteration_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(ITER_DIR.match(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete iteration directories under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and ITER_DIR.match(p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest`` names (None when there is none)."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    return root / latest.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """An iteration directory from an iteration directory, a ``checkpoints`` directory or a
    run directory (its ``latest``)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if (path / "metadata.json").is_file():
        return path
    raise UserError(f"{path} is neither a checkpoint (iter_* directory with metadata.json) nor "
                    "a run directory with checkpoints/latest")


CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class TrainedCheckpoint:
    """One iteration directory, its run directory (None for a lone checkpoint), its config
    and the file it was read from."""

    directory: Path
    run_dir: Path | None
    config: RunConfig
    config_path: Path


def locate(path: str | Path) -> TrainedCheckpoint:
    """A run directory (its ``checkpoints/latest``) or an iteration directory -> the checkpoint
    and the run config saved with it (or, failing that, the run directory's)."""
    directory = resolve_checkpoint(path)
    if not (directory / "metadata.json").is_file():
        raise UserError(f"{directory} is not a complete checkpoint (no metadata.json); pass "
                        "an earlier iteration directory")
    parent = directory.parent.parent
    run_dir = parent if directory.parent.name == "checkpoints" else None
    for candidate in (directory / CONFIG_NAME, None if run_dir is None else run_dir / CONFIG_NAME):
        if candidate is not None and candidate.is_file():
            return TrainedCheckpoint(directory, run_dir, load_run_config(candidate), candidate)
    raise UserError(f"{directory} has no {CONFIG_NAME} (and no run directory with one): the "
                    "model configuration is needed to read it")
