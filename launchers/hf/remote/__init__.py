"""Files shipped inside an exported model directory, never imported from here.

``configuration_e2d2.py`` and ``modeling_e2d2.py`` are the thin Hugging Face wrappers; they
import the reference model through relative imports of the ``e2d2_*.py`` files that
`launchers.hf.remote_code` generates from ``e2d2/`` next to them at export time.
"""
