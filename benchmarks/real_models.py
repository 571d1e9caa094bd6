"""Per-example gradient norms on real architectures: gradnoise against a plain step and Opacus.

The models are ``gradnoise.testing.hf_models`` (transformers configs with random weights, plus two
hand-written ones): GPT-2, BERT, Llama (untied, tied, LoRA), GPT-2 LoRA, ViT, a ViT with root
parameters, ConvNeXt, a GroupNorm ResNet-18, and ResNet / MobileNetV2 with BatchNorm in eval mode.
For each model and batch size every method runs interleaved in one process, as in
``engine_overhead.py``: each round times every method once, in rotating order, after one untimed
warm-up step each. Reported per method, for wall-clock and process CPU time: the median step time,
the ratio of medians to the plain forward+backward and the median of per-round ratios; how many
parameter tensors it covered; for gradnoise also how it measured them (``coverage()`` counts per
method string, and the names); and how far gradnoise's per-example total norms are from Opacus'
on the warm-up step. A method (or a model) that fails records its error as its result.

    python benchmarks/real_models.py                       # all models, JSON in benchmarks/results/
    python benchmarks/real_models.py --quick               # tiny configs, 2 rounds: a smoke test
    python benchmarks/real_models.py --models gpt2,vit --batches 8 --rounds 5
    python benchmarks/real_models.py --device cuda --autocast bf16

Each model runs in a fresh process (``--same-process`` turns that off): a process that has built
and stepped a dozen models before has an allocator state no single-model training run has, which
moved ratios by up to 0.5 between otherwise identical runs on this machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

from gradnoise.testing.hf_models import HF_MODELS, missing_requirements

HERE = Path(__file__).resolve().parent
LANGUAGE = ("gpt2", "bert", "llama", "llama_tied", "llama_lora", "gpt2_lora")
DEFAULT_BATCHES = {name: (16,) if name in LANGUAGE else (8, 32) for name in HF_MODELS}
QUICK_BATCHES = {name: (4,) if name in LANGUAGE else (4, 8) for name in HF_MODELS}
_LM = dict(d=32, layers=1, heads=4, seq=16, vocab=64)
QUICK_SIZES = {
    "gpt2": _LM,
    "bert": _LM,
    "llama": {**_LM, "kv_heads": 2, "ffn": 64},
    "llama_tied": {**_LM, "kv_heads": 2, "ffn": 64},
    "llama_lora": {**_LM, "kv_heads": 2, "ffn": 64},
    "gpt2_lora": _LM,
    "vit": dict(image=16, patch=4, d=32, layers=1, heads=2),
    "vit_root_params": dict(image=16, patch=4, d=32, layers=1, heads=2),
    "convnext": dict(image=16, widths=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
    "resnet18_groupnorm": dict(widths=(8, 16, 32, 64), groups=4),
    "resnet_bn_eval": dict(widths=(8, 16, 32, 64)),
    "mobilenet_bn_eval": dict(width=0.35),
}
METHODS = ("plain", "gradnoise", "opacus_ghost")


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:400]


def build(name: str, batch: int, sizes: dict, device: torch.device):
    torch.manual_seed(0)
    model, tensors, loss_fn = HF_MODELS[name](
        batch, generator=torch.Generator().manual_seed(0), **sizes
    )
    return model.to(device), tuple(t.to(device) for t in tensors), loss_fn


def with_autocast(loss_fn, device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return loss_fn

    def loss(model, *batch):
        with torch.autocast(device.type, dtype=dtype):
            return loss_fn(model, *batch).float()

    return loss


class Probe:
    """What the warm-up step of gradnoise / Opacus left: coverage, per-example total norms."""

    def __init__(self) -> None:
        self.gradnoise: dict | None = None
        self.opacus: dict | None = None

    def on_gradnoise(self, stats) -> None:
        if self.gradnoise is not None:
            return
        self.gradnoise = {}
        try:
            coverage = stats.coverage()
            self.gradnoise["coverage_counts"] = dict(Counter(coverage.values()).most_common())
            self.gradnoise["coverage"] = coverage
        except Exception as error:
            self.gradnoise["coverage_error"] = _error(error)
        try:
            self.gradnoise["total_norms"] = stats.total_sq_norms().detach().float().sqrt().cpu()
            self.gradnoise["noise_scale"] = _float(stats.noise_scale())
        except Exception as error:
            self.gradnoise["norms_error"] = _error(error)

    def on_opacus(self, wrapped) -> None:
        if self.opacus is not None:
            return
        trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
        self.opacus = {
            "total_norms": wrapped.get_norm_sample().detach().float().cpu(),
            "uncovered": [n for n, p in trainable if not hasattr(p, "_norm_sample")],
        }


def _float(estimate) -> dict:
    """The noise-scale estimate's numbers, NaN as None (JSON has no NaN)."""
    fields = ("b_simple", "trace_sigma", "grad_sq_norm")
    values = {f: float(getattr(estimate, f)) for f in fields}
    return {f: None if v != v else v for f, v in values.items()}


def prepare(model, batch, loss_fn, methods, probe: Probe, sync, max_step_s: float):
    """``{method: (step, covered)}`` that ran their warm-up, their failures and warm-up times."""
    steps, failures, warmup_ms = {}, {}, {}
    hooks = {"gradnoise": probe.on_gradnoise, "opacus_ghost": probe.on_opacus}
    for name in methods:
        try:
            factory = getattr(peers, name)
            if name in hooks:
                step, covered = factory(model, batch, loss_fn, on_step=hooks[name])
            else:
                step, covered = factory(model, batch, loss_fn)
            start = time.perf_counter()
            step()  # warm-up, and proof that it runs on this model
            sync()
            warmup_ms[name] = 1e3 * (time.perf_counter() - start)
        except ImportError as error:
            failures[name] = f"not installed: {error}"
            continue
        except Exception as error:  # a method that cannot handle the model is a result too
            failures[name] = _error(error)
            continue
        if name != "plain" and warmup_ms[name] > 1e3 * max_step_s:
            failures[name] = (
                f"too slow: warm-up step {warmup_ms[name] / 1e3:.1f} s > {max_step_s} s"
            )
            continue
        steps[name] = (step, covered)
    return steps, failures, warmup_ms


def time_interleaved(steps: dict, rounds: int, sync, failures: dict) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds of every step, methods interleaved round by round."""
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        live = [n for n in names if n in wall]
        for name in live[r % len(live) :] + live[: r % len(live)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            try:
                steps[name][0]()
                sync()
            except Exception as error:
                failures[name] = f"failed in round {r}: {_error(error)}"
                del wall[name], cpu[name]
                if name == "plain":
                    return {}, {}
                continue
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


def agreement(probe: Probe) -> float | None:
    """Max relative difference of gradnoise's per-example total norms from Opacus' (warm-up)."""
    ours = (probe.gradnoise or {}).get("total_norms")
    theirs = (probe.opacus or {}).get("total_norms")
    if ours is None or theirs is None or ours.shape != theirs.shape:
        return None
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max())


def run_one(name: str, batch_size: int, args, device: torch.device, sync) -> dict:
    entry: dict = {"batch": batch_size, "methods": {}, "failures": {}}
    try:
        model, batch, loss_fn = build(name, batch_size, args.sizes[name], device)
    except Exception as error:
        entry["error"] = f"build: {_error(error)}"
        return entry
    loss_fn = with_autocast(loss_fn, device, args.autocast_dtype)
    params = list(model.parameters())
    entry["params_total"] = len(params)
    entry["params_trainable"] = sum(p.requires_grad for p in params)
    entry["numel_trainable"] = sum(p.numel() for p in params if p.requires_grad)
    probe = Probe()
    steps, failures, warmup = prepare(
        model, batch, loss_fn, args.methods, probe, sync, args.max_step_seconds
    )
    entry["failures"] = failures
    if "plain" in steps:
        wall, cpu = time_interleaved(steps, args.rounds, sync, failures)
        for method in wall:
            entry["methods"][method] = {
                "wall": _ratios(wall[method], wall["plain"]),
                "cpu": _ratios(cpu[method], cpu["plain"]),
                "params_covered": steps[method][1](),
                "warmup_ms": warmup[method],
            }
    else:
        entry["error"] = f"plain step: {failures.get('plain')}"
    if probe.gradnoise is not None:
        info = {k: v for k, v in probe.gradnoise.items() if k != "total_norms"}
        entry["gradnoise"] = info
    if probe.opacus is not None:
        entry["opacus"] = {"uncovered": probe.opacus["uncovered"]}
    entry["max_rel_diff_gradnoise_vs_opacus"] = agreement(probe)
    del model, batch, steps, probe
    gc.collect()
    return entry


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":

        def sync():
            torch.cuda.synchronize(device)

    else:

        def sync():
            pass

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "opacus": _version("opacus"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "autocast": args.autocast,
        "rounds": args.rounds,
        "quick": args.quick,
        "methods": list(args.methods),
        "models": {},
    }
    for name in args.models:
        missing = missing_requirements(name)
        record = {"sizes": _jsonable(args.sizes[name]), "batches": {}}
        report["models"][name] = record
        if missing:
            record["error"] = f"not installed: {', '.join(missing)}"
            continue
        for batch_size in args.batches.get(name, DEFAULT_BATCHES[name]):
            print(f"{name} B={batch_size} ...", flush=True)
            record["batches"][str(batch_size)] = run_one(name, batch_size, args, device, sync)
    return report


def run_isolated(args) -> dict:
    """:func:`run` for every model in a subprocess of its own; their reports merged."""
    import subprocess
    import tempfile

    merged = None
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--models", name, "--out", tmp]
            command += ["--rounds", str(args.rounds), "--threads", str(args.threads)]
            command += ["--methods", ",".join(args.methods), "--device", args.device]
            command += ["--max-step-seconds", str(args.max_step_seconds)]
            if args.batches_text:
                command += ["--batches", args.batches_text]
            if args.autocast:
                command += ["--autocast", args.autocast]
            if args.quick:
                command.append("--quick")
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            filename = "real_models_quick.json" if args.quick else "real_models.json"
            report = json.loads((Path(tmp) / filename).read_text())
        if merged is None:
            merged = report
        else:
            merged["models"].update(report["models"])
        print(f"{name} done", flush=True)
    merged["isolated"] = True
    return merged


def _jsonable(sizes: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}


def _short(counts: dict | None) -> str:
    if not counts:
        return "-"
    return " ".join(f"{k.split(':')[0]}:{v}" for k, v in counts.items())


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="step time relative to a plain forward+backward (median paired ratio)")
    columns = ("model", "B", "method", "wall ms", "wall x", "cpu x", "params", "how / error")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "how / error") else "right")
    for name, record in report["models"].items():
        if "error" in record:
            table.add_row(name, "", "", "", "", "", "", record["error"][:200])
        for batch_size, entry in record["batches"].items():
            if "error" in entry and not entry["methods"]:
                table.add_row(name, batch_size, "", "", "", "", "", entry["error"][:200])
                continue
            trainable = entry.get("params_trainable", "?")
            for method, m in entry["methods"].items():
                how = ""
                if method == "gradnoise":
                    how = _short(entry.get("gradnoise", {}).get("coverage_counts"))
                    diff = entry.get("max_rel_diff_gradnoise_vs_opacus")
                    if diff is not None:
                        how += f"  (vs opacus {diff:.1e})"
                covered = "-" if method == "plain" else f"{m['params_covered']}/{trainable}"
                table.add_row(
                    name,
                    batch_size,
                    method,
                    f"{m['wall']['median_ms']:.1f}",
                    f"{m['wall']['median_paired_ratio']:.3f}",
                    f"{m['cpu']['median_paired_ratio']:.3f}",
                    covered,
                    how,
                )
            for method, why in entry["failures"].items():
                if method == "gradnoise" and "gradnoise" in entry:
                    why = f"{_short(entry['gradnoise'].get('coverage_counts'))} | {why}"
                table.add_row(name, batch_size, method, "failed", "", "", "", why[:200])
    Console(width=160).print(table)


def _batches(text: str | None, models: list[str]) -> dict[str, tuple[int, ...]]:
    if not text:
        return {}
    sizes = tuple(int(b) for b in text.split(","))
    return dict.fromkeys(models, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(HF_MODELS), help="comma-separated names")
    parser.add_argument("--methods", default=",".join(METHODS), help="names in peers.py")
    parser.add_argument(
        "--batches",
        help="comma-separated batch sizes for every model (default: LMs 16, vision 8,32)",
    )
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--quick", action="store_true", help="tiny configs, small batches, 2 rounds"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("bf16",), help="forward under torch.autocast")
    parser.add_argument(
        "--max-step-seconds",
        type=float,
        default=120.0,
        help="a method whose warm-up step takes longer is recorded as too slow and not timed",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument(
        "--same-process", action="store_true", help="run all models in this one process"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in HF_MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(HF_MODELS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    unknown = [m for m in args.methods if m not in peers.METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(peers.METHODS)}")
    args.autocast_dtype = torch.bfloat16 if args.autocast == "bf16" else None
    args.sizes = {name: {} for name in HF_MODELS}
    args.batches_text = args.batches
    args.batches = _batches(args.batches, args.models)
    if args.quick:
        args.rounds = 2
        args.sizes = QUICK_SIZES
        args.batches = args.batches or QUICK_BATCHES
    report = run_isolated(args) if not args.same_process and len(args.models) > 1 else run(args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("real_models_quick.json" if args.quick else "real_models.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
