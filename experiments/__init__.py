"""Ablation sweeps as code, their runner and report (python -m experiments.run / experiments.report)."""
