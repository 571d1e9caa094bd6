"""Overhead of per-example gradient statistics: gradnoise against a plain step and its peers.

For each workload (W1 MLP, W2 CNN, W3 GPT-like LM) every method runs interleaved in one process:
each round times every method once, in rotating order, so slow drifts of this shared machine hit
all methods alike. Reported per method, for wall-clock and for process CPU time: the median step
time, the ratio of medians to the plain forward+backward and the median of per-round ratios; and
how many parameter tensors it covered. With
``--memory`` each method also runs alone in a fresh process, and the peak resident memory its
steps add beyond what a plain step's add is reported.

    python benchmarks/engine_overhead.py                # full run, JSON in benchmarks/results/
    python benchmarks/engine_overhead.py --quick        # 3 rounds, no memory, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import METHODS

from gradnoise.testing.models import make_cnn, make_gpt, make_mlp

WORKLOADS = {"W1": make_mlp, "W2": make_cnn, "W3": make_gpt}
HERE = Path(__file__).resolve().parent


def build(workload: str):
    torch.manual_seed(0)
    return WORKLOADS[workload](generator=torch.Generator().manual_seed(0))


def prepare(workload: str, methods: list[str]):
    """``{method: (step, covered)}`` for the methods that could be set up, plus their failures."""
    model, batch, loss_fn = build(workload)
    steps, failures = {}, {}
    for name in methods:
        try:
            steps[name] = METHODS[name](model, batch, loss_fn)
            steps[name][0]()  # warm-up, and proof that it runs on this model
        except ImportError as error:
            failures[name] = f"not installed: {error}"
        except Exception as error:  # a peer that cannot handle the model is a result too
            failures[name] = f"{type(error).__name__}: {error}"[:300]
            steps.pop(name, None)
    return steps, failures, len(list(model.parameters()))


def time_interleaved(steps: dict, rounds: int) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds of every step, methods interleaved round by round.

    CPU time (all threads of this process) is what the step itself consumed; on a machine shared
    with other jobs it is far steadier than wall time, which also counts waiting for a core.
    """
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            steps[name][0]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _ratios(values: list[float], plain: list[float]) -> dict[str, float]:
    paired = [v / p for v, p in zip(values, plain, strict=True)]
    return {
        "median_ms": 1e3 * statistics.median(values),
        "ratio_of_medians": statistics.median(values) / statistics.median(plain),
        "median_paired_ratio": statistics.median(paired),
    }


def summarize(wall: dict, cpu: dict, steps: dict, total_params: int) -> dict:
    return {
        name: {
            "wall": _ratios(wall[name], wall["plain"]),
            "cpu": _ratios(cpu[name], cpu["plain"]),
            "params_covered": steps[name][1](),
            "params_total": total_params,
        }
        for name in wall
    }


def extra_peak_mib(workload: str, method: str, threads: int) -> float | None:
    """Peak resident memory a few steps of one method add, in a fresh process (MiB).

    CPU PyTorch keeps no allocator statistics, so the child resets the kernel's high-water mark
    (``/proc/self/clear_refs``), runs the steps and reads ``VmHWM`` minus the resident size before
    them; glibc is told to return freed blocks (``MALLOC_MMAP_THRESHOLD_``) so that transient
    tensors show up in the peak.
    """
    command = [sys.executable, __file__, "--child", workload, method, "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(workload: str, method: str) -> None:
    steps, failures, _ = prepare(workload, [method])  # includes one warm-up step
    if failures:
        raise SystemExit(1)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        steps[method][0]()
    print((_status_kib("VmHWM") - before) / 1024)


def run(args) -> dict:
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "device": "cpu",
        "rounds": args.rounds,
        "workloads": {},
    }
    for workload in args.workloads:
        steps, failures, total = prepare(workload, ["plain", *args.methods])
        wall, cpu = time_interleaved(steps, args.rounds)
        entry = {"methods": summarize(wall, cpu, steps, total), "failures": failures}
        if args.memory:
            base = extra_peak_mib(workload, "plain", args.threads)
            for name in steps:
                peak = extra_peak_mib(workload, name, args.threads)
                extra = None if peak is None or base is None else peak - base
                entry["methods"][name]["step_peak_mib"] = peak
                entry["methods"][name]["extra_peak_mib"] = extra
        report["workloads"][workload] = entry
        print_table(workload, entry)
    return report


def print_table(workload: str, entry: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{workload}: step time relative to a plain forward+backward")
    columns = ("method", "wall ms", "wall ratio", "cpu ms", "cpu ratio", "params", "extra MiB")
    for column in columns:
        table.add_column(column, justify="right")
    for name, m in entry["methods"].items():
        extra = m.get("extra_peak_mib")
        table.add_row(
            name,
            f"{m['wall']['median_ms']:.1f}",
            f"{m['wall']['median_paired_ratio']:.3f}",
            f"{m['cpu']['median_ms']:.1f}",
            f"{m['cpu']['median_paired_ratio']:.3f}",
            f"{m['params_covered']}/{m['params_total']}",
            "-" if extra is None else f"{extra:.0f}",
        )
    for name, why in entry["failures"].items():
        table.add_row(name, "failed", why[:60], "", "", "", "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "plain"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory runs")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engine_overhead.json")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child)
        return
    if args.quick:
        args.rounds, args.memory = 3, False
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
