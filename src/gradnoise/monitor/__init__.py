"""Records, sinks, plots and the HTML report of gradient-noise profiling, and the Monitor that
feeds them from any training loop (see :mod:`gradnoise.monitor.monitor`)."""

from gradnoise.monitor.monitor import Monitor, StepHandle
from gradnoise.monitor.profile import run_profile
from gradnoise.monitor.records import Metrics, read_metrics
from gradnoise.monitor.report import write_report

__all__ = ["Metrics", "Monitor", "StepHandle", "read_metrics", "run_profile", "write_report"]
