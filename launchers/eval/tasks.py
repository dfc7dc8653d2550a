"""The offline lm-eval task pack: task YAMLs over local JSON-lines files, built from the
held-out paragraphs of the embedded KJV corpus (`data_tools.corpus`; every ``HELD_OUT_EVERY``-th
paragraph, which ``e2d2 demo`` leaves out of its training corpus).

* ``kjv_cloze``: the first half of a sentence; choose its real second half among 4 (the
  others: second halves of other held-out sentences). ``acc``/``acc_norm``; chance 25%.
* ``kjv_lastword``: LAMBADA-style, a sentence without its last word; ``acc`` (the word is the
  model's greedy prediction, ``is_greedy``) and ``perplexity`` of the word.
* ``kjv_rolling``: the held-out paragraphs' ``word_perplexity``, ``byte_perplexity`` and
  ``bits_per_byte`` (``loglikelihood_rolling``).

``task_pack()`` writes the pack once into ``E2D2_TASK_PACK`` (default
``~/.cache/e2d2/lm_eval_tasks``) and returns the directory for ``--include_path``. Nothing is
downloaded: lm-eval reads the files with the ``datasets`` library's local ``json`` loader.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from data_tools.corpus import iter_documents
from launchers.hf.staging import staged_directory

HELD_OUT_EVERY = 20  # paragraph i is held out when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
VERSION = 1  # bump when the items change: a pack of another version is rebuilt
ITEMS = 300  # per task: enough for a percent-level accuracy, quick on CPU
CHOICES = 4
TASKS = ("kjv_cloze", "kjv_lastword", "kjv_rolling")


def is_held_out(index: int) -> bool:
    return index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def held_out_paragraphs() -> list[str]:
    return [text for i, text in enumerate(iter_documents("kjv")) if is_held_out(i)]


def drop_held_out(corpus: Path) -> int:
    """Rewrite an ``e2d2 data corpus kjv`` file without the held-out paragraphs (atomically);
    returns how many were dropped."""
    from data_tools.atomic import atomic_path

    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for i, line in enumerate(lines) if not is_held_out(i)]
    with atomic_path(corpus) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
    return len(lines) - len(kept)


def _sentences(paragraphs: list[str]) -> list[list[str]]:
    """Sentences of 8 to 40 words (the KJV's bracketed italics unbracketed), as word lists."""
    out = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.;:?!])\s+", paragraph.replace("[", "").replace("]", "")):
            words = sentence.split()
            if 8 <= len(words) <= 40:
                out.append(words)
    return out


def _items() -> dict[str, list[dict]]:
    paragraphs = held_out_paragraphs()
    sentences = _sentences(paragraphs)
    rng = random.Random(VERSION)
    picked = rng.sample(sentences, min(ITEMS, len(sentences)))
    halves = [(" ".join(w[:len(w) // 2]), " " + " ".join(w[len(w) // 2:])) for w in picked]
    cloze = []
    for i, (context, ending) in enumerate(halves):
        others = rng.sample([e for j, (_, e) in enumerate(halves) if j != i], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = others[:label] + [ending] + others[label:]
        cloze.append({"context": context, "choices": choices, "label": label})
    lastword = []
    for words in picked:
        last = words[-1].rstrip(".;:?!,")
        if last.isalpha():
            lastword.append({"context": " ".join(words[:-1]), "target": " " + last})
    rolling = [{"text": p} for p in paragraphs[:ITEMS]]
    return {"kjv_cloze": cloze, "kjv_lastword": lastword, "kjv_rolling": rolling}


def _yaml(task: str, data: Path) -> str:
    head = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data))}\ntest_split: test\n")
    body = {
        "kjv_cloze": ("output_type: multiple_choice\ndoc_to_text: context\n"
                      "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n"
                      "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                      "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
        "kjv_lastword": ("output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: target\n"
                         "metric_list:\n"
                         "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
        "kjv_rolling": ("output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
                        "metric_list:\n"
                        "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                        "  - metric: bits_per_byte\n"),
    }[task]
    return head + body + f"metadata:\n  version: {VERSION}.0\n"


def task_pack(directory: str | Path | None = None) -> Path:
    """The task pack's directory, built on first use (atomically: a half-written pack is
    never used)."""
    root = Path(directory or os.environ.get("E2D2_TASK_PACK")
                or Path.home() / ".cache" / "e2d2" / "lm_eval_tasks")
    stamp = root / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == str(VERSION):
        return root
    with staged_directory(root, overwrite=True) as tmp:
        for task, items in _items().items():
            with open(tmp / f"{task}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(item) + "\n" for item in items)
            # The YAML names the final path, where the data will be after the rename.
            (tmp / f"{task}.yaml").write_text(_yaml(task, root / f"{task}.jsonl"))
        (tmp / "VERSION").write_text(f"{VERSION}\n")
    return root
