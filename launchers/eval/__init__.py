"""Evaluation of pretrained models: ``e2d2 eval`` (zero-shot NELBO at any layout,
`launchers.eval.nelbo`), the lm-evaluation-harness model and ``e2d2 lm-eval``
(`launchers.eval.harness`), and the offline task pack (`launchers.eval.tasks`)."""
