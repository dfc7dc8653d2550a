"""Scaling-law sweeps over decoder depth: ``e2d2 sweep submit|status|collect SPEC``.

``spec`` expands a YAML spec into validated point configs, ``submit`` runs them (SLURM or
``--local``), ``status`` reports each point, ``bench`` is the per-point sampling benchmark,
``collect`` (with ``fit`` and ``plots``) writes the tables, fits and plots.
"""
