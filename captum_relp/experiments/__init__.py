"""Experiments of the RelP paper, as library functions (the CLI calls these).

* :mod:`~captum_relp.experiments.ioi` — IOI faithfulness of AtP/RelP vs AP (section 5.1)
* :mod:`~captum_relp.experiments.circuits` — sparse feature circuits (section 5.2)
"""
from .circuits import CircuitExperimentResult, run_circuit_experiment
from .ioi import IOIExperimentResult, run_ioi_experiment

__all__ = ["IOIExperimentResult", "run_ioi_experiment", "CircuitExperimentResult", "run_circuit_experiment"]
