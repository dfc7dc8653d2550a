"""The ``e2d2`` command line: options and overrides in any order, and help that does not
wait for torch and megatron-core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_helpers import make_data_dir, write_config

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


# Help, a dry run, the sweep's status and bad input answer without importing torch or
# megatron-core (checked in a fresh interpreter through sys.modules, which cannot be flaky as
# a timing would be); the exit code shows the case reached its answer.
_PROBE = """
import contextlib, io, json, sys
from launchers.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps([code, sorted(m for m in ("torch", "megatron.core") if m in sys.modules)]))
"""
HELP = [["--help"], *([name, "--help"] for name in COMMANDS if name != "lm-eval"),
        ["sweep", "status", "--help"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    data = make_data_dir(tmp_path_factory.mktemp("data"), documents=40)
    return write_config(tmp_path_factory.mktemp("config") / "tiny.yaml", data={"path": str(data)})


def _probe(argv: list[str], cwd: Path = ROOT) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    code, modules = json.loads(done.stdout.splitlines()[-1])
    return code, modules


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_help_imports_neither_torch_nor_megatron(argv):
    assert _probe(argv) == (0, [])


def test_a_dry_run_and_the_sweep_status_import_neither_torch_nor_megatron(tiny, tmp_path):
    # PP2 picks the encoder stages by the FLOPs balance, counted in closed form
    assert _probe(["submit", tiny, "parallel.pipeline_parallel=2", "--nodes", "1",
                   "--gpus-per-node", "2", "--dry-run"]) == (0, [])
    spec = ROOT / "configs/sweeps/decoder-depth-owt-h100.yaml"
    assert _probe(["sweep", "status", spec], cwd=tmp_path) == (0, [])


@pytest.mark.parametrize("argv", [
    ["pretrain", "{tiny}", "model.hidden_size=-1"],
    ["pretrain", "{tiny}", "model.no_such_key=1", "--nproc-per-node", "2"],
    ["profile", "{tiny}", "train.lr=-1"],
    ["submit", "{tiny}", "parallel.pipeline_parallel=5", "--dry-run"],
    ["sample", "/no/such/run", "--prompt", "x"],
    ["eval", "/no/such/run", "--data", "x"],
    ["export-hf", "/no/such/run", "out"],
], ids=" ".join)
def test_bad_input_is_refused_without_torch_or_megatron(tiny, argv):
    assert _probe([word.format(tiny=tiny) for word in argv]) == (2, [])
