"""The lm-evaluation-harness model ``e2d2`` and ``e2d2 lm-eval`` (docs/eval.md).

    e2d2 lm-eval --model_args pretrained=RUN_OR_CHECKPOINT_OR_EXPORT,mc_draws=32 --tasks kjv_cloze

lm-eval's own command line, with this model registered and the offline task pack
(`launchers.eval.tasks`) on the include path. The model is the reference model on one
process (CPU, or ``device=cuda``):

* ``loglikelihood``: `e2d2.likelihood.score_rows` on ``[EOD] + context + continuation`` (the
  context a clean prompt with the training-time prompt mask, the continuation scored):
  diffusion variants return ``-NELBO`` of the continuation from ``mc_draws`` stratified draws,
  a lower-bound estimate of its log-likelihood; AR the exact log-likelihood. ``is_greedy``:
  every continuation token is the argmax of its prediction with the whole continuation
  masked, each block given the clean blocks before it (AR: lm-eval's teacher-forced argmax).
* ``loglikelihood_rolling``: the same on the document's rows under ``e2d2 eval``'s
  ``document`` convention, summed.
* ``generate_until``: `e2d2.sampling.sample_prompts` with the run's sampler settings (lm-eval's
  ``until``, ``max_gen_toks``, ``temperature``/``do_sample`` override them), prompts of mixed
  lengths batched.

Every request draws from a generator seeded by its own content (and ``seed``), so a
request's numbers do not depend on the batch it is in.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from e2d2.errors import UserError
from e2d2.likelihood import request_generator

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError:  # the `eval` extra is not installed: `run_lm_eval` says so
    LM, register_model = object, None


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line with ``--model e2d2`` and the task pack by default."""
    if register_model is None:
        raise UserError("e2d2 lm-eval needs lm-evaluation-harness: pip install 'e2d2[eval]' "
                        "(or pip install lm-eval)")
    from lm_eval.__main__ import cli_evaluate

    from launchers.eval.tasks import task_pack

    args = list(argv)
    command = [args.pop(0)] if args and args[0] in ("run", "ls", "validate") else ["run"]
    if command == ["run"] and "--model" not in args:
        args = ["--model", "e2d2", *args]
    if "--include_path" not in args:
        args += ["--include_path", str(task_pack())]
    saved = sys.argv
    sys.argv = ["lm-eval", *command, *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def load_pretrained(path: str, ema: bool = False):
    """``(model, objective, tokenizer, sampler)`` from a run, an iteration directory or an
    ``e2d2 export-hf`` directory."""
    from e2d2.config import DiffusionConfig
    from e2d2.diffusion import DiffusionObjective

    directory = Path(path)
    config_json = directory / "config.json"
    if config_json.is_file() and json.loads(config_json.read_text()).get("model_type") == "e2d2":
        from safetensors.torch import load_file

        from data_tools.tokenizer import load_tokenizer
        from e2d2.config import SamplerConfig
        from e2d2.model import DiffusionLM
        from launchers.hf.import_hf import exported_model_config

        cfg = exported_model_config(json.loads(config_json.read_text()), str(config_json), None)
        model = DiffusionLM(cfg)
        state = {}
        for shard in sorted(directory.glob("*.safetensors")):
            state.update(load_file(shard))
        state = {k.removeprefix("model."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{directory}: the weights do not fit config.json (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")
        generation = directory / "generation_config.json"
        known = {f.name for f in dataclasses.fields(SamplerConfig)}
        sampler = SamplerConfig(**{k: v for k, v in (json.loads(generation.read_text()).items()
                                                     if generation.is_file() else ()) if k in known})
        # The schedule does not change the NELBO's expectation (docs/eval.md), only its spread.
        objective = DiffusionObjective(cfg, DiffusionConfig())
        return model.float().eval(), objective, load_tokenizer(directory), sampler
    from launchers.checkpoint_dirs import resolve_checkpoint
    from launchers.sample import load_reference_model, run_tokenizer

    checkpoint = resolve_checkpoint(path)
    run, model = load_reference_model(checkpoint, ema)
    return (model, DiffusionObjective(run.model, run.diffusion), run_tokenizer(run, checkpoint),
            run.sampler)


class E2D2Harness(LM):
    """lm-eval's ``LM`` over an e2d2 model (module docstring)."""

    def __init__(self, pretrained: str, mc_draws: int = 32, ema: bool = False, seed: int = 0,
                 batch_size: int | str = 8, max_batch_size: int | None = None,
                 device: str | None = None, max_gen_toks: int = 256, **sampler) -> None:
        super().__init__()
        self.model, self.objective, self.tokenizer, self.sampler = load_pretrained(pretrained, bool(ema))
        # lm-eval passes device=cuda by default: the CPU where there is no GPU.
        if device and (not str(device).startswith("cuda") or torch.cuda.is_available()):
            self.model.to(device)
        self.cfg = self.model.cfg
        self.mc_draws, self.seed = int(mc_draws), int(seed)
        if self.mc_draws < 1:
            raise UserError(f"mc_draws={mc_draws}: need >= 1")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        known = {f.name for f in dataclasses.fields(self.sampler)}
        unknown = set(sampler) - known
        if unknown:
            raise UserError(f"--model_args {sorted(unknown)}: not an e2d2 model argument nor a "
                            f"sampler setting ({', '.join(sorted(known))})")
        types = {f.name: type(getattr(self.sampler, f.name)) for f in dataclasses.fields(self.sampler)}
        self.sampler = dataclasses.replace(self.sampler, **{
            k: v if types[k] in (type(None), tuple) else types[k](v) for k, v in sampler.items()})

    # -- rows --------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context belong to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tokenizer.encode(context), self.tokenizer.encode(continuation)

    def _rows(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], int]]:
        """``[EOD] + context + continuation`` as rows of at most ``seq_length`` tokens:
        ``(ids, number of prompt tokens)``. One row when it fits (the context left-truncated
        if need be); else the continuation in pieces of ``seq_length // 2`` tokens, each
        after as many of the tokens before it as fit, as a clean prompt."""
        L = self.cfg.seq_length
        tokens = [self.tokenizer.eod] + context + continuation
        start = len(tokens) - len(continuation)
        piece = len(continuation) if len(continuation) < L else max(1, L // 2)
        rows = []
        for a in range(start, len(tokens), piece):
            b = min(a + piece, len(tokens))
            prompt = tokens[max(0, b - L):a]
            rows.append((prompt + tokens[a:b], len(prompt)))
        return rows

    def _score(self, rows: list[tuple[list[int], int]], generators,
               greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-likelihood estimate, is_greedy or None) of each ``(ids, prompt length)`` row."""
        from e2d2.likelihood import score_rows

        S = self.cfg.diffusion_block_size
        width = -(-max(len(ids) for ids, _ in rows) // S) * S
        x0 = torch.full((len(rows), width), self.tokenizer.pad, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        context = torch.zeros_like(real)
        for i, (ids, prompt) in enumerate(rows):
            x0[i, :len(ids)] = torch.tensor(ids)
            real[i, :len(ids)] = True
            context[i, :prompt] = True
        scored = score_rows(self.model, self.objective, x0, context, real, self.mc_draws,
                            generators, greedy)
        return scored.loglikelihood, scored.greedy

    def _batched(self, items: list, score) -> list:
        from tqdm.auto import tqdm

        out = []
        for start in tqdm(range(0, len(items), self.batch_size), desc="e2d2", unit="batch",
                          disable=not sys.stderr.isatty()):
            out += score(items[start:start + self.batch_size])
        return out

    # -- lm-eval's interface -------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        def score(batch):
            rows, gens, owner = [], [], []
            for index, req in enumerate(batch):
                pieces = self._rows(*self._encode_pair(*req.args))
                rows += pieces
                gens += [request_generator(self.seed, "loglikelihood", *req.args, k) for k in range(len(pieces))]
                owner += [index] * len(pieces)
            values, greedy = self._score(rows, gens)
            results = [[0.0, True] for _ in batch]
            for index, value, g in zip(owner, values.tolist(), greedy.tolist(), strict=True):
                results[index][0] += value
                results[index][1] &= g
            results = [(value, bool(g)) for value, g in results]
            for req, result in zip(batch, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", req.args, result)
            return results

        return self._batched(list(requests), score)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from launchers.eval.data import document_windows

        L, eod, pad = self.cfg.seq_length, self.tokenizer.eod, self.tokenizer.pad
        windows, owner = [], []
        for index, req in enumerate(requests):
            for k, (ids, length) in enumerate(document_windows(self.tokenizer.encode(req.args[0]), L, eod, pad)):
                windows.append(((ids[:length], 1), request_generator(self.seed, "rolling", req.args[0], k)))
                owner.append(index)

        def score(batch):
            values, _ = self._score([row for row, _ in batch], [g for _, g in batch], greedy=False)
            return values.tolist()

        per_window = self._batched(windows, score)
        totals = [0.0] * len(requests)
        for index, value in zip(owner, per_window, strict=True):
            totals[index] += value
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:
        from e2d2.sampling import sample_prompts

        def generate(batch):
            out = []
            for req in batch:  # the sampler settings of one request (lm-eval groups alike ones)
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or [self.tokenizer.decode([self.tokenizer.eod])]
                until = [until] if isinstance(until, str) else list(until)
                settings = {"max_new_tokens": int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                            "stop_strings": tuple(until),
                            "eos_token_id": self.sampler.eos_token_id
                            if self.sampler.eos_token_id is not None else self.tokenizer.eod}
                if "temperature" in kwargs:
                    settings["temperature"] = float(kwargs["temperature"])
                elif kwargs.get("do_sample") is False:
                    settings["temperature"] = 0.0
                out.append((context, dataclasses.replace(self.sampler, **settings)))
            texts = []
            for cfg in dict.fromkeys(c for _, c in out):
                group = [i for i, (_, c) in enumerate(out) if c == cfg]
                keep = max(1, self.cfg.seq_length - cfg.max_new_tokens)
                prompts = [([self.tokenizer.eod] + self.tokenizer.encode(out[i][0]))[-keep:] for i in group]
                seeds = [request_generator(self.seed, "generate", out[i][0]).initial_seed() for i in group]
                ids = sample_prompts(self.model, prompts, cfg, seeds=seeds, decode=self.tokenizer.decode)
                texts += list(zip(group, [self._cut(self.tokenizer.decode(x), cfg.stop_strings)
                                          for x in ids], strict=True))
            return [text for _, text in sorted(texts)]

        results = self._batched(list(requests), generate)
        for req, text in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    @staticmethod
    def _cut(text: str, stops: tuple[str, ...]) -> str:
        """The text before the first stop string."""
        ends = [text.find(s) for s in stops if s and s in text]
        return text[:min(ends)] if ends else text


if register_model is not None:
    register_model("e2d2")(E2D2Harness)
