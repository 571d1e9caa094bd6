"""Per-example clipped gradient sums: gradnoise against a plain step and two Opacus paths.

Every method computes the same thing, ``sum_i min(1, C / ||g_i||) g_i`` over a batch, with ``C``
the median per-example norm of the model's first batch (so about half the examples are clipped),
and no noise (privacy accounting is out of scope for all of them here):

* ``plain``: the ordinary forward and backward of the summed loss (the unclipped gradient), the
  cost floor;
* ``gradnoise``: :func:`gradnoise.stats.clipping.clipped_backward`, norms from GradStats in a
  first forward+backward, then a forward+backward of ``sum_i c_i l_i``;
* ``opacus_ghost``: Opacus' ``GradSampleModuleFastGradientClipping`` with ghost clipping, the two
  backward passes of ``DPTensorFastGradientClipping.backward`` over one retained graph;
* ``opacus_per_sample``: Opacus' ``GradSampleModule`` (per-sample gradients in ``grad_sample``),
  clipped and summed as its ``DPOptimizer`` does.

Validity: on the warm-up batch every method's ``.grad`` is compared with gradnoise's, and
gradnoise's with the explicit loop (one backward per example, clipped and summed): the maximum
relative difference over parameters and the parameter where it is. The clipped fraction is
recorded. Timing: methods
interleaved round by round after one warm-up step each (``real_models.time_interleaved``);
medians and ratios to the plain step.

    python benchmarks/clipping.py                # JSON in benchmarks/results/clipping.json
    python benchmarks/clipping.py --quick        # tiny models, 2 rounds: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models

from gradnoise.stats.clipping import clip_factors, clipped_backward
from gradnoise.testing import models
from gradnoise.testing.hf_models import HF_MODELS, missing_requirements
from gradnoise.testing.per_example import per_example_loss
from gradnoise.testing.reference import per_example_grads

HERE = Path(__file__).resolve().parent
OWN = {
    "W1": (models.make_mlp, 32, {}),
    "W2": (models.make_cnn, 32, {}),
    "W3": (models.make_gpt, 16, {}),
}
HF = {"gpt2": 16, "bert": 16, "llama": 16, "vit": 8, "convnext": 8}
QUICK_OWN = {"W1": {}, "W2": {}, "W3": {"vocab": 64, "dim": 32, "context": 16}}
METHODS = ("plain", "gradnoise", "opacus_ghost", "opacus_per_sample")


def build(name: str, quick: bool):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in OWN:
        factory, batch, sizes = OWN[name]
        sizes = QUICK_OWN[name] if quick else sizes
        return factory(8 if quick else batch, generator=generator, **sizes)
    sizes = real_models.QUICK_SIZES[name] if quick else {}
    return HF_MODELS[name](4 if quick else HF[name], generator=generator, **sizes)


def plain(model, batch, losses, max_norm):
    def step():
        model.zero_grad(set_to_none=True)
        losses(model, *batch).sum().backward()

    return step, model


def gradnoise(model, batch, losses, max_norm):
    def step():
        model.zero_grad(set_to_none=True)
        clipped_backward(model, lambda: losses(model, *batch), max_norm, reduction="sum")

    return step, model


def opacus_ghost(model, batch, losses, max_norm):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model),
        loss_reduction="sum",
        max_grad_norm=max_norm,
        use_ghost_clipping=True,
        strict=False,
    )

    def step():
        wrapped.zero_grad(set_to_none=True)
        per_example = losses(wrapped, *batch)
        per_example.sum().backward(retain_graph=True)  # pass 1: norms
        coefficients = wrapped.get_clipping_coef()
        wrapped.zero_grad(set_to_none=True)
        wrapped.disable_hooks()
        (coefficients * per_example).sum().backward()  # pass 2: the clipped sum
        wrapped.enable_hooks()

    return step, wrapped._module


def opacus_per_sample(model, batch, losses, max_norm):
    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(model), loss_reduction="sum", strict=False)
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def step():
        wrapped.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        losses(wrapped, *batch).sum().backward()
        samples = [p.grad_sample for p in params]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in samples]).sum(0).sqrt()
        factors = clip_factors(norms, max_norm)
        for p, g in zip(params, samples, strict=True):
            p.grad = torch.einsum("i,i...->...", factors, g)

    return step, wrapped._module


FACTORIES = {
    "plain": plain,
    "gradnoise": gradnoise,
    "opacus_ghost": opacus_ghost,
    "opacus_per_sample": opacus_per_sample,
}


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _max_rel_diff(got: dict, want: dict) -> dict | None:
    """The largest relative difference over parameters and which parameter it is (relative to
    the larger of the parameter's own norm and 1e-6 of the largest, so that gradients that are
    zero in theory, such as attention key biases, are compared at rounding level)."""
    if set(got) != set(want):
        return None
    scale = max(float(w.norm()) for w in want.values())
    diffs = {
        n: float((got[n] - want[n]).norm()) / max(float(want[n].norm()), 1e-6 * scale) for n in want
    }
    worst = max(diffs, key=diffs.get)
    return {"max": diffs[worst], "param": worst}


def reference_clipped(model, loss_fn, batch, max_norm: float) -> dict[str, torch.Tensor]:
    """The explicit loop: every example's gradient by its own backward, clipped, summed."""
    grads = per_example_grads(model, loss_fn, batch)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = clip_factors(norms, max_norm)
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in grads.items()}


def run_one(name: str, args) -> dict:
    model, batch, loss_fn = build(name, args.quick)
    losses = per_example_loss(loss_fn)
    probe = clipped_backward(model, lambda: losses(model, *batch), 1.0, reduction="sum")
    max_norm = float(probe.norms.median())
    entry = {
        "batch": int(batch[0].shape[0]),
        "max_norm": max_norm,
        "methods": {},
        "failures": {},
        "max_rel_diff_vs_gradnoise": {},
    }
    steps, grads = {}, {}
    for method in args.methods:
        try:
            step, module = FACTORIES[method](model, batch, losses, max_norm)
            step()
            grads[method] = _grads(module)
            steps[method] = (step, lambda: 0)
        except ImportError as error:
            entry["failures"][method] = f"not installed: {error}"
        except Exception as error:  # a method that cannot handle the model is a result too
            entry["failures"][method] = real_models._error(error)
    out = clipped_backward(model, lambda: losses(model, *batch), max_norm, reduction="sum")
    entry["clipped_fraction"] = out.clipped_fraction
    if "gradnoise" in grads:
        entry["max_rel_diff_gradnoise_vs_loop"] = _max_rel_diff(
            reference_clipped(model, loss_fn, batch, max_norm), grads["gradnoise"]
        )
    for method, got in grads.items():
        if method != "plain" and "gradnoise" in grads:
            entry["max_rel_diff_vs_gradnoise"][method] = _max_rel_diff(got, grads["gradnoise"])
    if "plain" in steps:
        wall, cpu = real_models.time_interleaved(
            steps, args.rounds, lambda: None, entry["failures"]
        )
        for method in wall:
            entry["methods"][method] = {
                "wall": real_models._ratios(wall[method], wall["plain"]),
                "cpu": real_models._ratios(cpu[method], cpu["plain"]),
            }
    steps.clear()
    gc.collect()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*OWN, *HF]))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "clipping.json")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    if args.quick:
        args.rounds = 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {
        "benchmark": "clipping",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rounds": args.rounds,
        "quick": args.quick,
        "models": {},
    }
    for name in args.models.split(","):
        if name in HF_MODELS and missing_requirements(name):
            report["models"][name] = {"error": f"missing {missing_requirements(name)}"}
            continue
        report["models"][name] = entry = run_one(name, args)
        cells = "  ".join(
            f"{m} {v['wall']['ratio_of_medians']:.2f}x" for m, v in entry["methods"].items()
        )
        print(
            f"{name:10s} B={entry['batch']:3d} clipped {entry['clipped_fraction']:.2f}  {cells}"
            f"  loop {entry.get('max_rel_diff_gradnoise_vs_loop')}"
            f"  diff {entry['max_rel_diff_vs_gradnoise']}  {entry['failures'] or ''}",
            flush=True,
        )
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
