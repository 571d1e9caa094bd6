"""``gradnoise``: the command line.

gradnoise profile [--workload NAME | --model MODULE:FACTORY] [--steps N] [--batch-size B]
                  [--every K] [--out DIR] [--no-console] [--seed S]
gradnoise report DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.text import Text

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.profile import as_workload, load_factory, run_profile
from gradnoise.monitor.recommend import overhead_text
from gradnoise.monitor.records import read_metrics
from gradnoise.monitor.report import write_report
from gradnoise.workloads import WORKLOADS, get_workload

__all__ = ["build_parser", "main"]

DEFAULTS = {
    "workload": "charlm",
    "steps": 800,
    "batch_size": 32,
    "every": 40,
    "out": "gradnoise-profile",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="gradnoise", description="Measure gradient noise.")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("profile", help="train a workload and profile its gradient noise")
    source = profile.add_mutually_exclusive_group()
    source.add_argument(
        "--workload",
        default=DEFAULTS["workload"],
        help=f"built-in workload: {', '.join(WORKLOADS)} (default charlm)",
    )
    source.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="your own model: factory(batch_size=B) -> (model, batches, loss_fn)",
    )
    profile.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    profile.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    profile.add_argument(
        "--every",
        type=int,
        default=DEFAULTS["every"],
        help="measure one step in EVERY (default 40)",
    )
    profile.add_argument("--out", default=DEFAULTS["out"], help="output directory")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--no-console", action="store_true", help="no live view")
    report = commands.add_parser("report", help="re-render report.html from DIR/metrics.jsonl")
    report.add_argument("dir")
    return parser


def _workload(args: argparse.Namespace):
    if args.model:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        factory = load_factory(args.model)
        return as_workload(factory(batch_size=args.batch_size), args.model)
    return get_workload(args.workload, batch_size=args.batch_size, seed=args.seed)


def _profile(args: argparse.Namespace, console: Console) -> None:
    workload = _workload(args)
    console.print(f"profiling [bold]{workload.name}[/]: {workload.description}")
    run = run_profile(
        workload, steps=args.steps, every=args.every, out=args.out, console=not args.no_console
    )
    console.print()
    console.print(overhead_text(run))
    console.print(
        f"report: {run['report']} (plots and page rendered in {run['report_seconds']:.1f} s "
        "after training, not part of the overhead above)"
    )


def _report(args: argparse.Namespace, console: Console) -> None:
    metrics = read_metrics(args.dir)
    path = write_report(args.dir)
    if metrics.skipped:
        console.print(f"skipped {metrics.skipped} unreadable line(s) of metrics.jsonl")
    console.print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with a one-line reason)."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        (_profile if args.command == "profile" else _report)(args, console)
    except GradNoiseError as error:
        message = Text("error: ", style="bold red") + Text(str(error))
        Console(stderr=True, soft_wrap=True).print(message, highlight=False)
        return 2
    return 0
