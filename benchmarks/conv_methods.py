"""Conv rule micro-benchmark: the cost-model constants, and rule time against the plain gradient.

``--fit`` measures the constants of ``gradnoise.layers.conv`` (each in multiply-add times of the
plain weight gradient, on shapes where its term dominates; fastest of ``--reps`` runs, since
other work on a shared CPU only adds time); the default run times the rule's
backward for the weight (old path ``grouped`` and the cost model's choice) against
``aten.convolution_backward`` with the weight mask, on ResNet-18 stage shapes. Medians of
``--reps`` runs; about 10 s each on a 2-core CPU.

    .venv/bin/python benchmarks/conv_methods.py --fit
    .venv/bin/python benchmarks/conv_methods.py [--elementwise] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from gradnoise.layers import conv
from gradnoise.layers.registry import Request, pieces_from_per_example, settled

# (C_in, C_out, map side): ResNet-18's 3x3 convolutions, late stages first, then an early one
SHAPES = [(512, 512, 1), (512, 512, 2), (256, 256, 4), (64, 64, 32)]
RULE = conv.ConvRule(2)


def times_ms(fn, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn, reps: int) -> float:
    return statistics.median(times_ms(fn, reps))


def best_ms(fn, reps: int) -> float:
    """The fastest run: the cost without the other work sharing the CPU (for the fit)."""
    return min(times_ms(fn, reps))


def case(batch: int, c_in: int, c_out: int, side: int):
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, side, side)
    weight = torch.randn(c_out, c_in, 3, 3)
    bound = RULE.bind(x, weight, None, 1, 1, 1, 1)
    return bound, torch.randn(batch, c_out, side, side)


def plain_weight_grad(bound, grad_output) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        grad_output, bound["input"], bound["weight"], None, (1, 1), (1, 1), (1, 1), False,
        (0, 0), 1, (False, True, False),
    )[1]  # fmt: skip


def ms_per_mac(reps: int) -> float:
    """Plain weight gradient on compute-bound shapes: milliseconds per multiply-add."""
    rates = []
    for c, side in [(64, 16), (128, 8)]:
        bound, grads = case(8, c, c, side)
        macs = 8 * side * side * c * c * 9
        rates.append(best_ms(partial(plain_weight_grad, bound, grads), reps) / macs)
    return statistics.median(rates)


def fit(reps: int) -> dict[str, float]:
    """Each constant: time per element (fastest run) over the time of a multiply-add, median of
    two shapes where its term dominates."""
    mac = ms_per_mac(reps)
    found = {name: [] for name in ("grouped", "bmm", "pass", "unfold", "gram", "gather")}
    for c, side in [(256, 2), (512, 2)]:  # tiny maps: writing the per-example gradients
        bound, grads = case(8, c, c, side)
        cols, rows = RULE._unfold(bound), grads.reshape(8, 1, c, -1)
        elements = 8 * c * c * 9
        per_example = RULE._per_example_weight(bound, grads)
        timed = {
            "grouped": (partial(RULE._per_example_weight, bound, grads), elements),
            "bmm": (partial(chunked_products, cols, rows, bound["weight"].shape), elements),
            "pass": (partial(_reduced, per_example), 2 * elements),
        }
        for name, (fn, count) in timed.items():
            found[name].append(best_ms(fn, reps) / count / mac)
    for c, side in [(128, 8), (256, 4)]:  # small maps: the Gram side
        bound, grads = case(8, c, c, side)
        cols, rows = RULE._unfold(bound), grads.reshape(8, 1, c, -1)
        positions = side * side
        unfolded, grams = 8 * c * 9 * positions, 8 * positions**2 * (c * 9 + c)
        found["unfold"].append(best_ms(partial(RULE._unfold, bound), reps) / unfolded / mac)
        found["gram"].append(best_ms(partial(unfolded_gram, cols, rows), reps) / grams / mac)
        gather, count = gather_step(bound, grads)
        found["gather"].append(best_ms(gather, reps) / count / mac)
    return {"ns_per_mac": mac * 1e6} | {k: statistics.median(v) for k, v in found.items()}


def chunked_products(cols: torch.Tensor, rows: torch.Tensor, shape) -> None:
    """The per-example products of ``conv._bmm``, chunk by chunk as it makes them."""
    chunk = max(1, conv.BMM_CHUNK_BYTES // (shape.numel() * cols.element_size()))
    for part_cols, part_rows in zip(cols.split(chunk), rows.split(chunk), strict=True):
        conv._per_example(part_cols, part_rows, shape)


def _reduced(per_example: torch.Tensor):
    """The two reduction passes (sum, squared norms), small gradients included."""
    return settled(pieces_from_per_example(per_example, Request(), "x"), Request())


def unfolded_gram(cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (torch.matmul(cols.mT, cols) * torch.matmul(rows.mT, rows)).sum((1, 2, 3))


def gather_step(bound, grads):
    """The gather of ``ConvRule._padded_input_grams`` alone, and how many entries it sums."""
    acts = F.pad(bound["input"], RULE._all_pads(bound))
    flat = acts.reshape(acts.shape[0], 1, acts.shape[1], -1)
    grams = torch.matmul(flat.mT, flat).flatten(2).permute(2, 0, 1).contiguous().flatten(1)
    kernel = tuple(bound["weight"].shape[2:])
    stride, dilation = conv._tuple(bound["stride"], 2), conv._tuple(bound["dilation"], 2)
    padded, out_shape = tuple(acts.shape[2:]), tuple(grads.shape[2:])
    pairs = conv._tap_pairs(padded, kernel, stride, dilation, out_shape, acts.device)
    taps = pairs.shape[0]
    pairs = pairs.flatten()
    return partial(_gather, grams, pairs, taps), acts.shape[0] * pairs.numel()


def _gather(grams, pairs, taps):
    return grams.index_select(0, pairs).view(taps, -1, grams.shape[1]).sum(0)


def compare(reps: int, request: Request) -> list[dict]:
    rows = []
    for batch in (8, 32):
        for c_in, c_out, side in SHAPES:
            bound, grads = case(batch, c_in, c_out, side)
            method = conv.choose_method(RULE._sizes(bound, grads), request)
            backward = partial(RULE.backward, bound, grads, ("weight",), request)
            plain = median_ms(partial(plain_weight_grad, bound, grads), reps)
            new = median_ms(backward, reps)
            choose, conv.choose_method = conv.choose_method, lambda *args: "grouped"
            try:
                old = median_ms(backward, reps)
            finally:
                conv.choose_method = choose
            rows.append(
                {"batch": batch, "shape": f"{c_in}->{c_out} {side}x{side}", "method": method,
                 "plain_ms": plain, "old_ms": old, "new_ms": new}
            )  # fmt: skip
            r = rows[-1]
            print(
                f"B={batch:2d} {r['shape']:>16}  plain {plain:7.2f} ms  old grouped {old:7.2f} ms"
                f" ({old / plain:6.1f}x)  new {method:>7} {new:7.2f} ms ({new / plain:4.2f}x)",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="measure the cost-model constants")
    parser.add_argument("--elementwise", action="store_true", help="time elementwise requests")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, help="torch threads (the fit uses 1: other work cannot stall it)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or (1 if args.fit else torch.get_num_threads()))
    if args.fit:
        result = fit(args.reps)
        print(json.dumps(result, indent=1))
    else:
        result = compare(args.reps, Request(elementwise=args.elementwise))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
