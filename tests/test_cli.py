"""The ``e2d2`` command line: options and overrides in any order, and help that does not
wait for torch and megatron-core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.cli import COMMANDS, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_may_follow_the_launcher_flag():
    args = parse_args(["pretrain", "configs/tiny-cpu.yaml", "--nproc-per-node", "2",
                       "run.dir=runs/x", "model.num_decoder_layers=3"])
    assert args.nproc_per_node == 2
    assert args.overrides == ["run.dir=runs/x", "model.num_decoder_layers=3"]
    args = parse_args(["submit", "c.yaml", "a.b=1", "--nodes", "2", "c.d=2", "--dry-run"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.nodes == 2 and args.dry_run


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["pretrain", "c.yaml", "--bogus", "2", "a.b=1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus 2 a.b=1" in capsys.readouterr().err


def test_every_command_registers_under_its_name():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(COMMANDS)


# Help answers without importing torch or megatron (checked in a fresh interpreter through
# sys.modules, which cannot be flaky as a timing would be).
_PROBE = """
import contextlib, io, json, sys
from launchers.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in ("torch", "megatron.core") if m in sys.modules)))
"""


@pytest.mark.parametrize("argv", [["--help"], ["submit", "--help"], ["sweep", "--help"],
                                  ["data", "--help"], ["demo", "--help"], ["export-hf", "--help"],
                                  ["import-hf", "--help"]])
def test_help_imports_neither_torch_nor_megatron(argv):
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
