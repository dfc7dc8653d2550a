"""The run's data inputs, checked before anything heavy is imported: its preprocessed
directories, their tokenizer, and the tokenizer's fit to the model (`e2d2 pretrain`,
`e2d2 submit` and `e2d2 eval` fail here, at once, with one message)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data_tools.tokenizer import E2D2Tokenizer, load_tokenizer
from data_tools.verify import verify_directory
from e2d2.config import ModelConfig
from e2d2.errors import UserError
from launchers.config import RunConfig, is_first_rank


def _check_directory(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"data.path {path} does not exist; create it with `e2d2 data preprocess "
                        f"--input ... --tokenizer ... --output {path}`")
    missing = [name for name in ("train.bin", "train.idx", "valid.bin", "valid.idx",
                                 "manifest.json", "tokenizer") if not (path / name).exists()]
    if missing:
        raise UserError(f"data.path {path} is not a complete `e2d2 data preprocess` output: "
                        f"{', '.join(missing)} missing; re-run preprocess into it")
    manifest = json.loads((path / "manifest.json").read_text())
    counts = {split: manifest.get(split, {}).get("documents") for split in ("train", "valid")}
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise UserError(f"data.path {path}: the {'/'.join(empty)} split has no documents; "
                        "re-run `e2d2 data preprocess` with more input (or --valid-docs)")


def load_run_tokenizer(cfg: RunConfig) -> E2D2Tokenizer:
    """The tokenizer of the run's data, checked against the model's vocabulary."""
    paths = [Path(p) for p in cfg.data.paths]
    if not paths:
        raise UserError("data.path is not set: pass data.path=DIR, a directory written by "
                        "`e2d2 data preprocess --output DIR`")
    for path in paths:
        _check_directory(path)
    tokenizer = load_tokenizer(paths[0] / "tokenizer")
    for path in paths[1:]:
        other = load_tokenizer(path / "tokenizer")
        if other.sha256 != tokenizer.sha256:
            raise UserError(f"data.path {path} was tokenized with another tokenizer than "
                            f"{paths[0]}; a blend needs one tokenizer")
    check_vocabulary(tokenizer, cfg.model, str(paths[0]))
    for path in paths:  # the cheap verification: sizes, counts, the recorded largest id
        verified = verify_directory(path, cfg.model.vocab_size, cfg.model.mask_token_id)
        if is_first_rank():
            for note in verified.notes:
                print(f"e2d2 pretrain: note: {note}", file=sys.stderr)
    return tokenizer


def check_vocabulary(tokenizer: E2D2Tokenizer, model: ModelConfig, where: str) -> None:
    if tokenizer.id_bound > model.vocab_size or tokenizer.mask_id != model.mask_token_id:
        raise UserError(
            f"the tokenizer of {where} (ids < {tokenizer.id_bound}, [MASK] = {tokenizer.mask_id}) "
            f"does not fit the model (vocab_size={model.vocab_size}, mask_token_id="
            f"{model.mask_token_id}); set model.vocab_size={tokenizer.id_bound} (or more) and "
            f"model.mask_token_id={tokenizer.mask_id}")
