"""A real single-node SLURM cluster on localhost for the tests (``slurm-up.sh``).

``slurm_cluster()`` starts it (installing Debian's slurm-wlm + munge with apt-get when
missing) and skips the test with the reason when slurm cannot be installed here. Several
pytest processes (xdist workers) share one cluster: each registers under
``PREFIX/users/``, and the last one to leave stops the daemons (by PID). Start and stop are
serialized by a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PREFIX = Path(os.environ.get("E2D2_SLURM_PREFIX", "/tmp/e2d2-slurm-ci"))
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED",
          "SIGNALING", "STAGE_OUT", "RESIZING"}


@dataclass(frozen=True)
class Cluster:
    prefix: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (and, through sbatch, for the jobs)."""
        return os.environ | {"SLURM_CONF": str(self.prefix / "etc" / "slurm.conf"),
                        "OMP_NUM_THREADS": "1"}

    def run(self, *command: str, timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run([str(c) for c in command], env=kwargs.pop("env", self.env),
                              capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (first record; arrays: the first task)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def states(self, job: str) -> list[str]:
        """States of the job (each task of an array)."""
        out = self.run("squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%T", check=False)
        return out.stdout.split()

    def wait(self, job: str, timeout: float, until: set[str] | None = None) -> list[str]:
        """Wait until every task of ``job`` left the active states (or reached ``until``)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job)
            if states and (all(s in until for s in states) if until
                           else not any(s in ACTIVE for s in states)):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still {states} after {timeout} s\n"
                                     + self.logs_tail())
            time.sleep(0.5)

    def logs_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.prefix / "log" / name
            if path.is_file():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    PREFIX.mkdir(parents=True, exist_ok=True)
    with open(PREFIX / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _live_users() -> list[Path]:
    users = []
    for entry in (PREFIX / "users").glob("*"):
        try:
            os.kill(int(entry.name), 0)
            users.append(entry)
        except (ProcessLookupError, ValueError):
            entry.unlink(missing_ok=True)
    return users


@contextlib.contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    """The running cluster for the duration of the block (see the module docstring)."""
    me = PREFIX / "users" / str(os.getpid())
    with _locked():
        up = subprocess.run(["bash", str(HERE / "slurm-up.sh")], capture_output=True, text=True,
                            timeout=900, env=os.environ | {"E2D2_SLURM_PREFIX": str(PREFIX)})
        if up.returncode == 3:
            pytest.skip(f"SLURM cannot be installed here: {up.stderr.strip().splitlines()[-1]}")
        assert up.returncode == 0, f"slurm-up.sh failed:\n{up.stderr[-3000:]}"
        me.parent.mkdir(exist_ok=True)
        me.touch()
    try:
        yield Cluster(PREFIX)
    finally:
        with _locked():
            me.unlink(missing_ok=True)
            if not _live_users():
                subprocess.run(["bash", str(HERE / "slurm-down.sh")], capture_output=True,
                               timeout=300, env=os.environ | {"E2D2_SLURM_PREFIX": str(PREFIX)})
