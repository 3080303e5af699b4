"""The workload interface for plug-in authors (`sciquant.plugins`), and the built-in workloads
(`sciquant.workloads.bloodflow`, `sciquant.workloads.md`) and the PyTorch plug-in base
(`sciquant.workloads.pytorch`) as its subpackages."""

from sciquant.plugins import ENTRY_POINTS, Evaluation, Workload, get_workload, workload_names

__all__ = ["ENTRY_POINTS", "Evaluation", "Workload", "get_workload", "workload_names"]
