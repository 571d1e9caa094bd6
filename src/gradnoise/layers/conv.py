r"""``F.conv1d`` / ``F.conv2d``: per-example pieces by product, Gram, bmm or a grouped convolution.

Example i, group j of g: the unfolded input :math:`U_{ij} \in R^{f \times L}` (column l holds the
f = c K inputs that output position l reads: c = C_in / g channels, K kernel taps; L output
positions) and the output gradient :math:`G_{ij} \in R^{o \times L}` (o = C_out / g). The
per-example weight gradient is :math:`W_{ij} = G_{ij} U_{ij}^T`; with M = B g o f per-example
gradient elements the weight gradient itself costs L M multiply-adds. Four ways to the pieces:

* **product** (L = 1): :math:`\|W_i\|^2 = \sum_j \|g_{ij}\|^2 \|u_{ij}\|^2`; elementwise
  squares :math:`\sum_i W_{ij}^{\circ 2} = \sum_i g_{ij}^{\circ 2} (u_{ij}^{\circ 2})^T`, a GEMM of
  squares.
* **gram**: :math:`\|W_i\|^2 = \sum_j \langle U_{ij}^T U_{ij}, G_{ij}^T G_{ij} \rangle`; the summed
  gradient is the plain weight gradient. :math:`U^T U` comes from the unfolded input (B g f L^2
  multiply-adds), or from the Gram of the zero-padded input :math:`X_{ij} \in R^{c \times P}`
  (P padded positions): :math:`(U^T U)_{ll'} = \sum_t (X^T X)_{p_t(l) p_t(l')}`, where
  :math:`p_t(l)` is the position tap t of output l reads (B g c P^2 multiply-adds, B g K L^2
  numbers gathered, nothing unfolded).
* **bmm**: materialize :math:`W_{ij}` by batched GEMMs on the unfolded input (in batch chunks),
  then reduce.
* **grouped**: the batch folded into the channels (input ``(1, B C_in, *S)``, groups times B)
  makes all :math:`W_i` the weight gradient of one grouped convolution, by the backend's kernel;
  with one input channel per group (depthwise) they are one *forward* depthwise convolution of
  the input with the output gradient as kernel, a much faster kernel.

Costs, in multiply-add times of the plain weight gradient (constants below, measured):

=======  ===================================================================================
grouped  :math:`M \max(L, c_{grouped})` + passes
bmm      :math:`M \max(L, c_{bmm}) + c_{unfold} B g f L` + passes
gram     :math:`L M + c_{gram} B g o L^2 + B g \min(c_{unfold} f L + c_{gram} f L^2,\;
         c_{gram} c P^2 + c_{gather} K L^2)`
passes   :math:`c_{pass} M` per pass over the materialized gradients (sum, norm, squares)
=======  ===================================================================================

The max is the kernels' floor: however few positions each element sums, writing it costs about
c multiply-adds. Per call the cheapest wins; elementwise squares and whole per-example gradients
need the materialized ones (or product), so gram only serves plain requests. The bias gradient of
example i is :math:`G_i` summed over positions (``direct``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.layers.registry import (
    BaseRule,
    Pieces,
    Request,
    batched_sq_norms,
    chunked_pieces,
    gram_unsure,
    pieces_from_per_example,
    rebuilt,
    register,
    require_batched,
)

__all__ = [
    "BMM_CHUNK_BYTES",
    "BMM_ELEMENT_COST",
    "GATHER_COST",
    "GRAM_COST",
    "GROUPED_ELEMENT_COST",
    "PASS_COST",
    "UNFOLD_COST",
    "ConvRule",
    "ConvSizes",
    "choose_gram_input",
    "choose_method",
    "method_costs",
]

# Cost-model constants in multiply-add times of the plain weight gradient (10.4 ps on one thread,
# 6.6 ps on two), measured on the project's 2-core x86_64 CPU (torch 2.13 CPU) with
# `benchmarks/conv_methods.py --fit`: time per element of each path on two shapes where its term
# dominates (fastest of 5 runs, one thread, median of the shapes; three fits agreed within 10%,
# two-thread fits within 35%), over the time per multiply-add of `aten.convolution_backward` on
# compute-bound 3x3 shapes. The grouped floor is mostly page faults: its output (all per-example
# gradients, tens of MB) is freshly mapped memory on every call (70 when glibc recycles it).
GROUPED_ELEMENT_COST = 390.0  # grouped kernel's floor per per-example gradient element
BMM_ELEMENT_COST = 44.0  # batched GEMM of inner size L, chunk by chunk: floor per element
UNFOLD_COST = 95.0  # F.unfold, per unfolded element
GRAM_COST = 2.4  # Gram GEMMs (batched, L x L outputs) and their product, per multiply-add
GATHER_COST = 42.0  # X^T X entries gathered into U^T U (index_select of rows, sum), per entry
PASS_COST = 13.0  # one reduction pass (sum, squared norms) over one materialized element
# bmm materializes per-example gradients in batch chunks of at most this many bytes: chunks that
# stay in cache reduce faster than one large tensor (512->512 3x3 on 2x2, B=32, elementwise:
# 1, 2, 4, 8, 32 examples of 9.4 MB per chunk took 231, 109, 106, 127, 220 ms).
BMM_CHUNK_BYTES = 32 * 2**20


class ConvSizes(NamedTuple):
    """One call's sizes, named as in the module docstring."""

    batch: int  # B
    groups: int  # g
    channels: int  # c, input channels per group
    taps: int  # K, kernel positions
    outputs: int  # o, output channels per group
    positions: int  # L, output positions
    padded: int  # P, positions of the zero-padded input
    windowed: bool = False  # the columns are a view of the input (no unfold; see _window)

    @property
    def fan_in(self) -> int:
        return self.channels * self.taps

    @property
    def elements(self) -> int:
        """M: the numbers in all per-example weight gradients."""
        return self.batch * self.groups * self.outputs * self.fan_in


def choose_method(sizes: ConvSizes, request: Request) -> str:
    """``product``, ``gram``, ``bmm`` or ``grouped`` for one call, by the docstring's cost model."""
    if sizes.positions == 1 and not request.materialize:
        return "product"
    costs = method_costs(sizes, request)
    return min(costs, key=costs.__getitem__)


def method_costs(sizes: ConvSizes, request: Request) -> dict[str, float]:
    """Estimated cost of each method that can serve ``request`` (multiply-add times)."""
    s, elements = sizes, sizes.elements
    unfolded = 0.0 if s.windowed else UNFOLD_COST * s.batch * s.groups * s.fan_in * s.positions
    passes = 1 if request.materialize else 3 if request.elementwise else 2
    reductions = PASS_COST * passes * elements
    costs = {
        "grouped": elements * max(s.positions, GROUPED_ELEMENT_COST) + reductions,
        "bmm": elements * max(s.positions, BMM_ELEMENT_COST) + unfolded + reductions,
    }
    if not (request.elementwise or request.materialize):
        output_grams = GRAM_COST * s.batch * s.groups * s.outputs * s.positions**2
        input_grams = min(_gram_input_costs(s).values())
        costs["gram"] = elements * s.positions + output_grams + input_grams
    return costs


def choose_gram_input(sizes: ConvSizes) -> str:
    """Where gram gets :math:`U^T U`: ``unfold`` or ``padded`` (the padded input's Gram)."""
    costs = _gram_input_costs(sizes)
    return min(costs, key=costs.__getitem__)


def _gram_input_costs(s: ConvSizes) -> dict[str, float]:
    unfold = (0.0 if s.windowed else UNFOLD_COST * s.fan_in * s.positions) + (
        GRAM_COST * s.fan_in * s.positions**2
    )
    padded = GRAM_COST * s.channels * s.padded**2 + GATHER_COST * s.taps * s.positions**2
    return {"unfold": s.batch * s.groups * unfold, "padded": s.batch * s.groups * padded}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class ConvRule(BaseRule):
    param_roles = ("weight", "bias")
    gives_input_grad = True  # engine protocol (added by the engine rewrite)
    broadcasts = True

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.name = f"conv{dims}d"
        self.intercepts = (F.conv1d,) if dims == 1 else (F.conv2d,)
        self.modules = (nn.Conv1d,) if dims == 1 else (nn.Conv2d,)

    def bind(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return {
            "input": input,
            "weight": weight,
            "bias": bias,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
        }

    def check(self, bound: dict[str, Any], roles) -> None:
        layout = "(B, C, L)" if self.dims == 1 else "(B, C, H, W)"
        require_batched(self.name, bound["input"], self.dims + 2, layout)

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(**bound)

    def contract_cases(self):
        make = nn.Conv1d if self.dims == 1 else nn.Conv2d

        def inputs(channels: int) -> tuple[torch.Tensor]:
            return (torch.randn(3, channels, *(7,) * self.dims, dtype=torch.float64),)

        return [
            ("conv", make(2, 4, 3).double(), inputs(2)),
            (
                "conv, stride 2, dilation 2, 2 groups, no bias",
                make(4, 6, 2, stride=2, dilation=2, groups=2, bias=False).double(),
                inputs(4),
            ),
            (
                "conv, 'same', depthwise",
                make(3, 6, 3, padding="same", groups=3).double(),
                inputs(3),
            ),
            ("conv to one position", make(2, 3, 7).double(), inputs(2)),
        ]

    def input_grad(
        self, bound: dict[str, Any], grad_output: torch.Tensor, roles=()
    ) -> torch.Tensor:
        """``aten.convolution_backward`` for the input only (the weight gradient is ours)."""
        acts, pads = self._padded_input(bound)
        grad_input = self._backward(grad_output, acts, bound["weight"], bound, (True, False, False))
        if any(pads):  # string padding resolved by padding the input: cut the margins off again
            slices = [slice(None), slice(None)]
            for axis in range(self.dims):
                left, right = pads[2 * (self.dims - 1 - axis)], pads[2 * (self.dims - 1 - axis) + 1]
                slices.append(slice(left, grad_input.shape[2 + axis] - right))
            grad_input = grad_input[tuple(slices)]
        return grad_input

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        pieces = {}
        if "weight" in roles:
            pieces["weight"] = self._weight_pieces(bound, grad_output, request)
        if "bias" in roles:
            bias = grad_output.flatten(2).sum(2)
            pieces["bias"] = pieces_from_per_example(bias, request, "direct")
        return pieces

    def _weight_pieces(self, bound, grad_output: torch.Tensor, request: Request) -> Pieces:
        sizes = self._sizes(bound, grad_output)
        method = choose_method(sizes, request)
        if method == "grouped":
            per_example = self._per_example_weight(bound, grad_output)
            return pieces_from_per_example(per_example, request, "grouped")
        grads = grad_output.reshape(sizes.batch, sizes.groups, sizes.outputs, sizes.positions)
        if method == "gram":
            return self._gram(bound, grad_output, grads, sizes)
        cols = self._unfold(bound, grad_output.shape[2:])
        if method == "product":
            pieces = _product(cols[..., 0], grads[..., 0], bound["weight"].shape, request)
            if pieces.recompute is not None:
                pieces.recompute = rebuilt(pieces.recompute, bound["input"])
            return pieces
        return _bmm(cols, grads, bound["weight"].shape, request)

    def _sizes(self, bound, grad_output: torch.Tensor) -> ConvSizes:
        weight, groups = bound["weight"], bound["groups"]
        return ConvSizes(
            batch=grad_output.shape[0],
            groups=groups,
            channels=weight.shape[1],
            taps=math.prod(weight.shape[2:]),
            outputs=weight.shape[0] // groups,
            positions=math.prod(grad_output.shape[2:]),
            padded=math.prod(self._padded_shape(bound)),
            windowed=self._windowed(bound, grad_output.shape[2:]),
        )

    def _windowed(self, bound, out_shape) -> bool:
        """Whether :meth:`_unfold` reads the columns from the input without a copy."""
        padding = bound["padding"]
        if padding == "same":
            pads = self._all_pads(bound)
            if any(pads):
                return False
        padding = (0,) * self.dims if isinstance(padding, str) else _tuple(padding, self.dims)
        kernel = bound["weight"].shape[2:]
        dilation = _tuple(bound["dilation"], self.dims)
        return _windowable(kernel, padding, dilation, out_shape)

    def _gram(self, bound, grad_output: torch.Tensor, grads, sizes: ConvSizes) -> Pieces:
        if choose_gram_input(sizes) == "padded":
            input_grams = self._padded_input_grams(bound, grad_output.shape[2:])
        else:
            cols = self._unfold(bound, grad_output.shape[2:])
            input_grams = torch.matmul(cols.mT, cols)
        output_grams = torch.matmul(grads.mT, grads)
        sq_norms = (input_grams * output_grams).sum((1, 2, 3))
        # |u_l| |g_l| per position from the Grams' diagonals, for the rounding bound
        norm_products = (input_grams.diagonal(0, 2, 3) * output_grams.diagonal(0, 2, 3)).sqrt()
        unsure = gram_unsure(norm_products, sq_norms)
        grad = self._weight_grad(bound, grad_output)
        recompute = None  # from the input and output gradient, when smaller than the gradient
        if bound["input"].numel() + grad_output.numel() < grad.numel():
            build = lambda: self._weight_grad(bound, grad_output)  # noqa: E731
            recompute = rebuilt(build, bound["input"])
        return Pieces(grad, sq_norms, None, None, "gram", recompute, unsure=unsure)

    def _padded_input_grams(self, bound, out_shape) -> torch.Tensor:
        """``(B, groups, L, L)``: :math:`U^T U` gathered from the zero-padded input's Gram."""
        acts = F.pad(bound["input"], self._all_pads(bound))
        batch, groups = acts.shape[0], bound["groups"]
        flat = acts.reshape(batch, groups, -1, math.prod(acts.shape[2:]))
        # (P * P, B, groups): gathering whole rows is ~10x faster than gathering along a last dim
        grams = torch.matmul(flat.mT, flat).flatten(2).permute(2, 0, 1).contiguous()
        kernel = tuple(bound["weight"].shape[2:])
        stride, dilation = _tuple(bound["stride"], self.dims), _tuple(bound["dilation"], self.dims)
        padded, out_shape = tuple(acts.shape[2:]), tuple(out_shape)
        pairs = _tap_pairs(padded, kernel, stride, dilation, out_shape, acts.device)  # (K, L, L)
        picked = grams.index_select(0, pairs.flatten()).view(*pairs.shape, batch, groups)
        return picked.sum(0).permute(2, 3, 0, 1)

    def _weight_grad(self, bound, grad_output: torch.Tensor) -> torch.Tensor:
        """The plain (summed) weight gradient."""
        acts, _ = self._padded_input(bound)
        return self._backward(grad_output, acts, bound["weight"], bound, (False, True, False))

    def _per_example_weight(self, bound, grad_output: torch.Tensor) -> torch.Tensor:
        weight = bound["weight"]
        if weight.shape[1] == 1:
            return self._per_example_depthwise(bound, grad_output)
        acts, _ = self._padded_input(bound)
        batch = acts.shape[0]
        folded_acts = acts.reshape(1, -1, *acts.shape[2:])
        folded_grads = grad_output.reshape(1, -1, *grad_output.shape[2:])
        # only the shape of the weight matters for its own gradient
        folded_weight = weight.new_empty((batch * weight.shape[0], *weight.shape[1:]))
        per_example = self._backward(
            folded_grads, folded_acts, folded_weight, bound, (False, True, False), batch
        )
        return per_example.reshape(batch, *weight.shape)

    def _per_example_depthwise(self, bound, grad_output: torch.Tensor) -> torch.Tensor:
        r"""One input channel per group (depthwise): :math:`W_{i}[t] = \sum_l G_i[l]\,
        X_i[s l + d t]` is a *forward* depthwise convolution of the padded input with the output
        gradient as its kernel (dilated by the stride s, strided by the dilation d), cropped to
        the kernel: the backend's forward kernel is 7-10x faster than the grouped weight
        gradient on 7x7 kernels (ConvNeXt), and as fast on 3x3 ones."""
        weight = bound["weight"]
        acts = F.pad(bound["input"], self._all_pads(bound))
        batch, channels = acts.shape[:2]
        conv = F.conv1d if self.dims == 1 else F.conv2d
        stride, dilation = _tuple(bound["stride"], self.dims), _tuple(bound["dilation"], self.dims)
        correlation = conv(
            acts.reshape(1, batch * channels, *acts.shape[2:]),
            grad_output.reshape(batch * weight.shape[0], 1, *grad_output.shape[2:]),
            stride=dilation,
            dilation=stride,
            groups=batch * channels,
        )
        kernel = (slice(None), slice(None), *(slice(0, k) for k in weight.shape[2:]))
        return correlation[kernel].reshape(batch, *weight.shape)

    def _unfold(self, bound, out_shape=None) -> torch.Tensor:
        """``(B, groups, f, L)``: column l holds the inputs that output position l sees.

        Without padding, a 1x1 kernel's columns are the (strided) input itself and a single
        output position's column is the input's top-left kernel window: both without
        ``F.unfold``'s copy (``out_shape``: the output's spatial shape, if known).
        """
        acts, _ = self._padded_input(bound)
        padding = bound["padding"]
        padding = (0,) * self.dims if isinstance(padding, str) else _tuple(padding, self.dims)
        dilation, stride = _tuple(bound["dilation"], self.dims), _tuple(bound["stride"], self.dims)
        window = _window(acts, bound["weight"].shape[2:], padding, dilation, stride, out_shape)
        if window is not None:
            columns, positions = window
            return columns.reshape(acts.shape[0], bound["groups"], -1, positions)
        args = [tuple(bound["weight"].shape[2:]), dilation, padding, stride]
        if self.dims == 1:  # F.unfold takes images only: a signal is an image of height 1
            acts = acts.unsqueeze(2)
            args = [(fill, *arg) for fill, arg in zip((1, 1, 0, 1), args, strict=True)]
        cols = F.unfold(acts, *args)
        return cols.reshape(acts.shape[0], bound["groups"], -1, cols.shape[-1])

    def _backward(self, grad_output, acts, weight, bound, mask, group_factor: int = 1):
        padding = bound["padding"]
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            acts,
            weight,
            None,
            _tuple(bound["stride"], self.dims),
            (0,) * self.dims if isinstance(padding, str) else _tuple(padding, self.dims),
            _tuple(bound["dilation"], self.dims),
            False,
            (0,) * self.dims,
            bound["groups"] * group_factor,
            mask,
        )
        return grads[0] if mask[0] else grads[1]

    def _padded_input(self, bound) -> tuple[torch.Tensor, list[int]]:
        """The input with string padding applied explicitly, and the ``F.pad`` amounts used."""
        acts, padding = bound["input"], bound["padding"]
        if padding != "same":
            return acts, [0] * (2 * self.dims)
        pads = self._all_pads(bound)
        return F.pad(acts, pads), pads

    def _all_pads(self, bound) -> list[int]:
        """``F.pad`` amounts (last axis first) of the convolution's padding, string or numeric."""
        padding = bound["padding"]
        if padding == "valid":
            return [0] * (2 * self.dims)
        if padding != "same":
            return [p for p in reversed(_tuple(padding, self.dims)) for _ in range(2)]
        kernel = bound["weight"].shape[2:]
        dilation = _tuple(bound["dilation"], self.dims)
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [p for t in reversed(totals) for p in (t // 2, t - t // 2)]

    def _padded_shape(self, bound) -> tuple[int, ...]:
        pads = self._all_pads(bound)[::-1]  # first axis first, (right, left) per axis
        spatial = bound["input"].shape[2:]
        return tuple(n + pads[2 * a] + pads[2 * a + 1] for a, n in enumerate(spatial))


def _window(acts, kernel, padding, dilation, stride, out_shape):
    """``(columns, L)``: the columns as a view (or strided slice) of the input, channel-major as
    ``F.unfold`` orders them, where no copy is needed; else None."""
    if not _windowable(kernel, padding, dilation, out_shape):
        return None
    if all(k == 1 for k in kernel):  # each output position reads one input position
        if any(s != 1 for s in stride):
            acts = acts[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        return acts, math.prod(acts.shape[2:])
    return acts[(slice(None), slice(None), *(slice(0, k) for k in kernel))], 1


def _windowable(kernel, padding, dilation, out_shape) -> bool:
    """No padding, and a 1x1 kernel or a single output position with an undilated kernel."""
    if any(padding):
        return False
    if all(k == 1 for k in kernel):
        return True
    return out_shape is not None and math.prod(out_shape) == 1 and all(d == 1 for d in dilation)


@functools.lru_cache(maxsize=256)
def _tap_pairs(padded, kernel, stride, dilation, out_shape, device) -> torch.Tensor:
    """``(K, L, L)``: the entries of the padded input's ``P x P`` Gram that taps of output
    positions l and l' read (built once per shape and device: a model has a few dozen)."""
    taps = _tap_positions(padded, kernel, stride, dilation, out_shape)
    return (taps[:, :, None] * math.prod(padded) + taps[:, None, :]).to(device)


def _tap_positions(padded, kernel, stride, dilation, out_shape) -> torch.Tensor:
    """``(K, L)``: where in the flattened padded input tap t of output position l reads."""
    index = torch.zeros(1, 1, dtype=torch.long)
    for size, k, s, d, n in zip(padded, kernel, stride, dilation, out_shape, strict=True):
        axis = torch.arange(k)[:, None] * d + torch.arange(n) * s
        index = index[:, None, :, None] * size + axis[None, :, None, :]
        index = index.flatten(0, 1).flatten(1, 2)
    return index


def _row_sq_norms(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, groups)`` squared norms of the rows of a ``(B, groups, n)`` tensor."""
    return batched_sq_norms(tensor.flatten(0, 1)).view(tensor.shape[:2])


def _product(acts: torch.Tensor, grads: torch.Tensor, shape, request: Request) -> Pieces:
    """One output position: ``acts`` ``(B, groups, f)``, ``grads`` ``(B, groups, o)``."""
    grad = _summed_outer(grads, acts).reshape(shape)
    sq_norms = (_row_sq_norms(grads) * _row_sq_norms(acts)).sum(1)
    elem_sq = None
    if request.elementwise:
        elem_sq = _summed_outer(grads.pow(2), acts.pow(2)).reshape(shape)
    # the factors are smaller than the gradient when B g (o + f) < g o f (late stages)
    smaller = grads.numel() + acts.numel() < grad.numel()
    recompute = (lambda: _summed_outer(grads, acts).reshape(shape)) if smaller else None
    return Pieces(grad, sq_norms, elem_sq, None, "product", recompute)


def _summed_outer(grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``(g, o, f)``: sum over b of ``grads[b, j] acts[b, j]^T`` (one GEMM per group, batched
    over groups; ``einsum`` picks a much slower plan for many small groups)."""
    if grads.shape[1] == 1:
        return (grads[:, 0].T @ acts[:, 0]).unsqueeze(0)
    return torch.bmm(grads.permute(1, 2, 0), acts.transpose(0, 1))


def _per_example(cols: torch.Tensor, grads: torch.Tensor, shape) -> torch.Tensor:
    return torch.matmul(grads, cols.mT).reshape(cols.shape[0], *shape)


def _bmm(cols: torch.Tensor, grads: torch.Tensor, shape, request: Request) -> Pieces:
    if request.materialize:
        return pieces_from_per_example(_per_example(cols, grads, shape), request, "bmm")

    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        g, c = grads[start:stop], cols[start:stop]
        torch.matmul(g, c.mT, out=out.view(*g.shape[:-1], c.shape[-2]))

    return chunked_pieces(cols.shape[0], tuple(shape), cols, fill, request, "bmm", BMM_CHUNK_BYTES)


register(ConvRule(1))
register(ConvRule(2))
