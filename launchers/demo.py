"""``e2d2 demo``: the whole pipeline on the embedded KJV corpus, on CPU, in about 5 minutes.

1. ``e2d2 data corpus kjv``, ``e2d2 data train-tokenizer`` (byte-level BPE, 2048 ids) and
   ``e2d2 data preprocess`` into megatron indexed datasets;
2. ``e2d2 pretrain configs/tiny-cpu.yaml`` on 2 gloo ranks, the encoder on pipeline stage 0
   and the decoder on stage 1;
3. the validation NELBO and perplexity bound;
4. ``e2d2 sample`` from the checkpoint (block sampler with KV cache);
5. ``e2d2 export-hf``, then a fresh process loads the export with
   ``transformers.AutoModelForMaskedLM`` (offline) and generates one sample;
6. ``e2d2 lm-eval`` on the offline ``kjv_cloze`` task (held-out KJV paragraphs, left out of
   the training corpus in step 1): accuracy against chance (needs the ``eval`` extra).

Everything goes under ``--run-dir`` (default ``runs/demo``), which a later demo replaces; a
directory that is not a demo's own is never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from e2d2.errors import UserError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
MARKER = ".e2d2-demo"
PROMPTS = ("And God said, ", "In the beginning ")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="preprocess, pretrain on 2 CPU ranks, evaluate, sample",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="run config (default configs/tiny-cpu.yaml)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2: PP2)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.steps=100")
    p.set_defaults(func=run)


def _fresh(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).is_file():
            raise UserError(f"{root} exists and is not a demo directory; pass another --run-dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by e2d2 demo; replaced by the next demo\n")


def e2d2(argv: list) -> int:
    """``e2d2 ARGV`` in a child process, as a user would type it (the CLI imports this module,
    not the other way round)."""
    return subprocess.run([sys.executable, "-m", "launchers.cli", *map(str, argv)]).returncode


def run(args: argparse.Namespace) -> int:
    from launchers.config import load_run_config
    from launchers.metrics import VALID_NELBO_NAME, read_metrics, train_loss_name

    root = Path(args.run_dir)
    cfg = load_run_config(args.config, args.overrides)  # a bad config fails before any work
    _fresh(root)
    corpus, tokenizer, data, run_dir = (root / "kjv.jsonl", root / "tokenizer", root / "data",
                                        root / "run")
    print("== 1. data: corpus, tokenizer, indexed datasets", flush=True)
    if e2d2(["data", "corpus", "kjv", "--output", str(corpus)]) != 0:
        return 1
    from launchers.eval.tasks import drop_held_out

    print(f"held out {drop_held_out(corpus)} paragraphs for the lm-eval task pack (step 6)")
    for argv in (["data", "train-tokenizer", "--input", corpus, "--output", tokenizer,
                  "--vocab-size", "2048"],
                 ["data", "preprocess", "--input", corpus, "--tokenizer", tokenizer,
                  "--output", data]):
        if e2d2(argv) != 0:
            return 1
    print(f"== 2. pretrain on {args.nproc} gloo ranks", flush=True)
    code = e2d2(["pretrain", args.config, f"run.dir={run_dir}", f"data.path={data}",
                 *args.overrides, "--nproc-per-node", str(args.nproc)])
    if code != 0:
        return code
    evals = [r for r in read_metrics(run_dir) if "nelbo" in r]
    first, last = evals[0], evals[-1]
    print(f"== 3. validation: NELBO {first['nelbo']:.3f} -> {last['nelbo']:.3f} nats/token "
          f"(perplexity <= {last['ppl']:.1f}) after {last['step']} steps: the {VALID_NELBO_NAME}. "
          f"The 'loss' of the training steps is the "
          f"{train_loss_name(cfg.diffusion.loss_weighting, cfg.model.variant)}")
    print("== 4. sample from the checkpoint", flush=True)
    prompts = [arg for text in PROMPTS for arg in ("--prompt", text)]
    code = e2d2(["sample", str(run_dir), *prompts, "--max-new-tokens", "48"])
    if code != 0:
        return code
    print("== 5. export to Hugging Face format and load it back with transformers", flush=True)
    hf_dir = root / "hf"
    code = e2d2(["export-hf", str(run_dir), str(hf_dir)])
    if code != 0:
        return code
    loaded = subprocess.run([sys.executable, "-c", _HF_LOAD, str(hf_dir), PROMPTS[0]],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if loaded.returncode != 0:
        return loaded.returncode
    print(f"TensorBoard logs: tensorboard --logdir {run_dir / 'tensorboard'}")
    return _lm_eval_step(root, run_dir)


def _lm_eval_step(root: Path, run_dir: Path) -> int:
    import importlib.util
    import json

    from launchers.cli import main as e2d2

    print("== 6. lm-eval: the offline kjv_cloze task (4 choices)", flush=True)
    if importlib.util.find_spec("lm_eval") is None:
        print("skipped: lm-evaluation-harness is not installed (pip install '.[eval]')")
        return 0
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # local files only
    out = root / "lm-eval"
    code = e2d2(["lm-eval", "--model_args", f"pretrained={run_dir},mc_draws=4", "--tasks",
                 "kjv_cloze", "--limit", "100", "--batch_size", "32", "--output_path", str(out)])
    if code != 0:
        return code
    result = json.loads(max(out.rglob("results_*.json")).read_text())["results"]["kjv_cloze"]
    print(f"kjv_cloze accuracy {result['acc,none']:.3f} ± {result['acc_stderr,none']:.3f} "
          f"(chance 0.250)")
    return 0


# What a user of the export runs: transformers alone, offline.
_HF_LOAD = """
import sys
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
path, prompt = sys.argv[1:]
torch.manual_seed(0)
model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, strategy="topk", steps=4, temperature=0.7)
print("transformers:", repr(tokenizer.decode(out[0])))
"""
