"""Experiments of the RelP paper, as library functions (the CLI calls these)."""
from .ioi import IOIExperimentResult, run_ioi_experiment

__all__ = ["IOIExperimentResult", "run_ioi_experiment"]
