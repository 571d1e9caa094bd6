"""Built-in offline training problems for ``gradnoise profile``, the examples and the benchmarks.

Every workload makes its data inside the package (a synthetic Markov language, generated images,
an embedded text), so nothing is downloaded at run time. ``get_workload(name, batch_size=...,
seed=...)`` builds one.
"""

from gradnoise.workloads.base import DEFAULT_WORKLOAD, WORKLOADS, Workload, get_workload

__all__ = ["DEFAULT_WORKLOAD", "WORKLOADS", "Workload", "get_workload"]
