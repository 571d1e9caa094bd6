"""Built-in offline training problems for ``gradnoise profile``, the examples and the benchmarks.

Every workload ships its data inside the package (an embedded text, a generated image set), so
nothing is downloaded at run time. ``get_workload(name, batch_size=..., seed=...)`` builds one.
"""

from gradnoise.workloads.base import WORKLOADS, Workload, get_workload

__all__ = ["WORKLOADS", "Workload", "get_workload"]
