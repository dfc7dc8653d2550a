"""Hugging Face interoperability: ``e2d2 export-hf`` (training checkpoint -> a model directory
that ``transformers`` loads with ``trust_remote_code``) and ``e2d2 import-hf`` (a Qwen3 /
Llama causal LM -> a training checkpoint). See docs/hf.md."""
