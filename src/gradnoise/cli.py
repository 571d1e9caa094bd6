"""``gradnoise``: the command line.

gradnoise profile [--workload NAME | --model MODULE:FACTORY] [--steps N] [--batch-size B]
                  [--every K] [--lr LR] [--out DIR] [--no-console] [--seed S]
gradnoise report DIR
gradnoise evaluate RESULTS.jsonl [--compare OTHER.jsonl | --systems A,B] [--k 1,5,10] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradnoise.errors import GradNoiseError, explain
from gradnoise.evaluation.display import renderables
from gradnoise.evaluation.plots import plot_evaluation
from gradnoise.evaluation.results import read_results
from gradnoise.evaluation.summary import summarize
from gradnoise.monitor.calibrate import (
    CALIBRATION_FILE,
    CalibrationSettings,
    agreement_text,
    calibrate,
)
from gradnoise.monitor.checks import check_batch_size, check_every, check_out_dir
from gradnoise.monitor.profile import DEFAULT_LR, as_workload, check_run, load_factory, run_profile
from gradnoise.monitor.recommend import (
    TRADE_OFF_HEADER,
    batch_advice,
    layer_advice,
    overhead_text,
    trade_off_table,
)
from gradnoise.monitor.records import read_metrics
from gradnoise.monitor.report import write_report
from gradnoise.workloads import DEFAULT_WORKLOAD, WORKLOADS, get_workload
from gradnoise.workloads.hf import is_config_spec, make_hf_workload

__all__ = ["build_parser", "main"]

DEFAULTS = {
    "workload": DEFAULT_WORKLOAD,
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
        help=f"built-in workload: {', '.join(WORKLOADS)} (default {DEFAULT_WORKLOAD}; markov and "
        "images draw fresh data every batch, charlm memorizes a short text)",
    )
    source.add_argument(
        "--model",
        metavar="MODULE:FACTORY|CONFIG",
        help="your own model: FACTORY(batch_size=B) returns a Workload or (model, batches, "
        "loss_fn) with loss_fn(model, batch) the batch-mean loss; a finite batches iterable "
        "(a list, a DataLoader) is re-iterated each epoch until --steps steps have run. Or "
        "CONFIG, a local transformers config.json or model directory: its causal LM is built "
        "with random weights and trained on --data, nothing is downloaded",
    )
    profile.add_argument(
        "--data",
        metavar="PATH",
        help='with --model CONFIG: a local UTF-8 text, or a .jsonl file with a "text" field '
        "per line; the first 90%% of its tokens train, the last 10%% are held out",
    )
    profile.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="T",
        help="with --model CONFIG: tokens per example (default: 128, or the model's context "
        "if shorter)",
    )
    profile.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS["steps"],
        help=f"training steps, AdamW (default {DEFAULTS['steps']})",
    )
    profile.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help=f"examples per step, at least 2; passed to the factory with --model "
        f"(default {DEFAULTS['batch_size']})",
    )
    profile.add_argument(
        "--every",
        type=int,
        default=DEFAULTS["every"],
        help=f"measure one step in EVERY (default {DEFAULTS['every']})",
    )
    profile.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: the workload's own, 3e-3 for the built-in ones; "
        f"{DEFAULT_LR:g} for a (model, batches, loss_fn) factory and a --model CONFIG)",
    )
    profile.add_argument(
        "--out",
        default=DEFAULTS["out"],
        help=f"output directory, created if missing (default {DEFAULTS['out']})",
    )
    profile.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model initialisation and batch order; with --model, torch and random "
        "are seeded before the factory is called (default 0)",
    )
    profile.add_argument("--no-console", action="store_true", help="no live view")
    report = commands.add_parser("report", help="re-render report.html from DIR/metrics.jsonl")
    report.add_argument("dir")
    _add_calibrate(commands)
    _add_evaluate(commands)
    return parser


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _add_calibrate(commands) -> None:
    d = CalibrationSettings()
    calibrate = commands.add_parser(
        "calibrate",
        help="measure the critical batch with fixed-batch runs and compare it with B_simple",
    )
    calibrate.add_argument(
        "--workload", default=d.workload, help=f"built-in workload (default {d.workload})"
    )
    calibrate.add_argument(
        "--batches",
        type=_ints,
        default=d.batches,
        help=f"batch sizes, comma-separated (default {','.join(map(str, d.batches))})",
    )
    calibrate.add_argument(
        "--lr-factors",
        type=_floats,
        default=d.lr_factors,
        help="learning-rate grid around the square-root rule, comma-separated (default "
        f"{','.join(map(str, d.lr_factors))})",
    )
    calibrate.add_argument(
        "--seeds",
        type=_ints,
        default=d.seeds,
        help="seeds, comma-separated; the spread over them is reported (default 0)",
    )
    calibrate.add_argument(
        "--budget",
        type=int,
        default=d.budget_examples,
        help="examples of the reference run (the middle batch size, at the workload's learning "
        f"rate), which sets the loss targets; other runs may use {d.budget_factor:g}x "
        f"(default {d.budget_examples})",
    )
    calibrate.add_argument(
        "--out",
        default=DEFAULTS["out"],
        help="directory for calibration.json (a profile's report there shows it; default "
        f"{DEFAULTS['out']})",
    )


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="intervals of a benchmark score over items and seeds, paired comparison, pass@k",
    )
    evaluate.add_argument(
        "results",
        metavar="RESULTS.jsonl",
        help='one JSON object per line: {"item": id, "score": x} or {"item": id, "correct": '
        'true}, optionally "system", "seed", "sample" (docs/evaluation.md)',
    )
    other = evaluate.add_mutually_exclusive_group()
    other.add_argument("--compare", metavar="OTHER.jsonl", help="a second system's file")
    other.add_argument(
        "--systems",
        type=lambda text: tuple(text.split(",")),
        metavar="A,B",
        help="compare these two systems of the file (default: the two, when it holds two)",
    )
    evaluate.add_argument(
        "--k", type=_ints, default=(1, 5, 10), help="pass@k for these k (default 1,5,10)"
    )
    evaluate.add_argument(
        "--confidence", type=float, default=0.95, help="interval level (default 0.95)"
    )
    evaluate.add_argument(
        "--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    evaluate.add_argument(
        "--out",
        default=None,
        help="directory for RESULTS.evaluation.png (default: the results file's directory)",
    )


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    results = read_results(args.results)
    other = read_results(args.compare) if args.compare else None
    out = check_out_dir(args.out if args.out is not None else results.path.parent)
    evaluation = summarize(
        results,
        other=other,
        systems=args.systems,
        ks=args.k,
        confidence=args.confidence,
        resamples=args.resamples,
        seed=args.seed,
    )
    for part in renderables(evaluation):
        console.print(part)
    plot = plot_evaluation(evaluation, out / f"{results.path.stem}.evaluation.png")
    console.print(Text(f"plot: {plot}"))


def _workload(args: argparse.Namespace):
    # with --data, a bare name is a config too (a hub name, refused: nothing is downloaded)
    if args.model and (is_config_spec(args.model) or (args.data and ":" not in args.model)):
        if not args.data:
            raise GradNoiseError(
                explain(
                    f"--model {args.model}",
                    expected="--data PATH with it (a local text or .jsonl file to train on)",
                    got="no --data",
                    fix=f"run gradnoise profile --model {args.model} --data my_text.txt",
                )
            )
        os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: only local files are ever read
        return make_hf_workload(
            args.model,
            args.data,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
        )
    for flag, value in (("--data", args.data), ("--seq-len", args.seq_len)):
        if value is not None:
            raise GradNoiseError(
                explain(
                    flag,
                    expected="--model CONFIG beside it (a transformers config.json or "
                    "model directory)",
                    got=f"{flag} {value} with "
                    + (f"--model {args.model}" if args.model else f"--workload {args.workload}"),
                    fix=f"drop {flag}, or pass --model path/to/config.json",
                )
            )
    if args.model:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        factory = load_factory(args.model)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        return as_workload(factory(batch_size=args.batch_size), args.model)
    return get_workload(args.workload, batch_size=args.batch_size, seed=args.seed)


def _profile(args: argparse.Namespace, console: Console) -> None:
    # every check that needs no model runs first, so bad input never trains or writes anything
    check_batch_size(args.batch_size)
    check_every(args.every)
    check_run(args.steps, args.every)
    check_out_dir(args.out, create=False)
    workload = _workload(args)
    console.print(f"profiling [bold]{workload.name}[/]: {workload.description}")
    run = run_profile(
        workload,
        steps=args.steps,
        every=args.every,
        out=args.out,
        console=not args.no_console,
        lr=args.lr,
    )
    console.print()
    if run.get("batches_exhausted"):
        console.print(
            f"note: the batches ran out after {run['steps']} of {args.steps} steps (a one-shot "
            "iterator cannot be restarted; return a list or a DataLoader to cycle it)"
        )
    _print_trade_off(console, args.out)
    console.print(overhead_text(run))
    console.print(
        f"report: {run['report']} (plots and page rendered in {run['report_seconds']:.1f} s "
        "after training, not part of the overhead above)"
    )


def _print_trade_off(console: Console, out: str) -> None:
    """The report's recommendation and trade-off table, on the console."""
    metrics = read_metrics(out)
    last, meta = metrics.steps[-1], metrics.run or {}
    console.print(
        batch_advice(metrics.batch_size, last, metrics.steps[0], optimizer=meta.get("optimizer"))
    )
    cells = trade_off_table(metrics.batch_size, last)
    if cells:
        table = Table(*TRADE_OFF_HEADER, title="predicted trade-off (docs/profile.md)")
        for row in cells:
            table.add_row(*row)
        console.print(table)
    console.print(layer_advice(metrics.steps))


def _report(args: argparse.Namespace, console: Console) -> None:
    metrics = read_metrics(args.dir)
    path = write_report(args.dir)
    if metrics.skipped:
        console.print(f"skipped {metrics.skipped} unreadable line(s) of metrics.jsonl")
    console.print(f"report: {path}")


def _calibrate(args: argparse.Namespace, console: Console) -> None:
    settings = replace(
        CalibrationSettings(),
        workload=args.workload,
        batches=tuple(sorted(set(args.batches))),
        lr_factors=args.lr_factors,
        seeds=args.seeds,
        budget_examples=args.budget,
    )
    check_out_dir(args.out)
    runs = len(settings.seeds) * len(settings.batches) * len(settings.lr_factors)
    console.print(f"calibrating [bold]{settings.workload}[/]: {runs} fixed-batch runs")
    result = calibrate(settings, out=args.out, progress=console.print)
    console.print(agreement_text(result))
    console.print(f"calibration: {Path(args.out) / CALIBRATION_FILE} ({result['seconds']:.0f} s)")
    if (Path(args.out) / "metrics.jsonl").is_file():
        console.print(f"report: {write_report(args.out)} (now with the calibration)")


COMMANDS = {
    "profile": "_profile",
    "report": "_report",
    "calibrate": "_calibrate",
    "evaluate": "_evaluate",
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with a one-line reason)."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        globals()[COMMANDS[args.command]](args, console)
    except GradNoiseError as error:
        message = Text("error: ", style="bold red") + Text(str(error))
        Console(stderr=True, soft_wrap=True).print(message, highlight=False)
        return 2
    return 0
