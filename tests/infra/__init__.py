"""Test infrastructure: a real local SLURM cluster, two network-namespace "hosts", and the
worker that such launches run."""
