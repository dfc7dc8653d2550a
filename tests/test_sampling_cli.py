"""``e2d2 sample``'s sampler flags: one per `SamplerConfig` field, generated from the dataclass.
(The command end to end, its output format and its equality with the exported generate():
``tests/test_hf_generate.py``.)"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from e2d2.errors import ConfigError
from e2d2.sampling import SamplerConfig
from launchers.sample import add_sampler_flags, sampler_overrides


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_sampler_flags(parser)
    return parser.parse_args(list(argv))


def _flag_actions():
    parser = argparse.ArgumentParser()
    add_sampler_flags(parser)
    return [a for a in parser._actions if a.dest != "help"]


def test_every_sampler_field_has_a_flag():
    flags = {a.dest: a.option_strings for a in _flag_actions()}
    assert set(flags) == {f.name for f in dataclasses.fields(SamplerConfig)}
    for name, options in flags.items():
        assert "--" + name.replace("_", "-") in options
    assert "--stop" in flags["stop_strings"]


def test_flags_override_only_what_is_given():
    assert sampler_overrides(_parse()) == {}
    args = _parse("--top-p", "0.5", "--stop", "\n\n", "--stop-strings", "END", "--sliding-window",
                  "--block-size", "2", "--min-t", "0.1", "--no-use-cache", "--eos-token-id", "none",
                  "--strategy", "threshold", "--max-new-tokens", "7")
    overrides = sampler_overrides(args)
    assert overrides == {"top_p": 0.5, "stop_strings": ["\n\n", "END"], "sliding_window": True,
                         "block_size": 2, "min_t": 0.1, "use_cache": False, "eos_token_id": None,
                         "strategy": "threshold", "max_new_tokens": 7}
    run = SamplerConfig(steps=5, block_size=4, eos_token_id=3)
    cfg = dataclasses.replace(run, **{**overrides, "use_cache": True})
    assert cfg.steps == 5 and cfg.block_size == 2 and cfg.eos_token_id is None
    assert cfg.stop_strings == ("\n\n", "END")


def test_bad_values_are_one_clear_error():
    with pytest.raises(argparse.ArgumentError, match="invalid float value"):
        _parse("--top-p", "lots")
    with pytest.raises(ConfigError, match="top_p must be in"):
        dataclasses.replace(SamplerConfig(), **sampler_overrides(_parse("--top-p", "1.5")))
