"""The rule registry: which functional ops gradnoise measures, and the records rules exchange.

A *rule* handles one family of torch functions (``F.linear``, ``torch.addmm``, ``Tensor.mul``...)
and is declared **once**: the class states what it intercepts, which arguments may hold tracked
parameters, which argument carries the batch, and what it can do; ``register(rule)`` routes the
functions it intercepts. Nothing else lists rules: coverage is derived from which rule ran.

The engine calls the op itself with the tracked parameters detached, so autograd computes only the
gradient of the input; in backward the rule gets the call's bound arguments and the output
gradient (batch on dim 0, broadcast inputs already expanded to the batch) and returns, for each
parameter role ("weight", "bias"), the summed gradient that autograd would have produced plus the
per-example pieces: squared norms, and on request elementwise squares or whole per-example
gradients. Computing the summed gradient from the same data as the pieces is what keeps the cost
close to a plain backward.

Adding a rule is one file with one class and one ``register(...)`` line, imported from
``gradnoise/layers/__init__.py``; ``tests/engine/test_rule_contract.py`` runs every registered rule
against the per-example reference loop by itself, on the small models its ``contract_cases()``
builds.

Gradient scale: rules work in the scale autograd hands them (a mean-reduced loss makes every
output gradient carry a 1/B); the engine rescales per the declared loss reduction. Dtype: rules
get float32 (or float64) tensors; the engine upcasts half-precision data before calling them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.factors import Factors

__all__ = [
    "DEFER_NUMEL",
    "GRAM_TOLERANCE",
    "BaseRule",
    "Pieces",
    "Request",
    "Rule",
    "batched_sq_norms",
    "chunked_pieces",
    "gram_unsure",
    "pieces_from_per_example",
    "plain_module_types",
    "rebuilt",
    "register",
    "registered_rules",
    "require_batched",
    "rule_for",
    "settled",
    "sq_norm",
]


@dataclass(frozen=True)
class Request:
    """What the engine needs from one backward call of a rule."""

    elementwise: bool = False
    materialize: bool = False  # whole per-example gradients, for parameters used more than once
    batch: int | None = None  # examples in the block, for rules whose rows are not the batch
    # the rule's factored_roles give Factors (cross terms, factors.py) instead of materializing:
    # set when such a role's parameter is shared and every use of it can give factors
    factored: bool = False


@dataclass
class Pieces:
    """Per-example pieces of one parameter from one use, in autograd's gradient scale.

    grad         sum over examples of the per-example gradients (the batch gradient contribution)
    sq_norms     (B,) squared norms of the per-example gradients, or None when materialized
    elem_sq      elementwise sum over examples of squared per-example gradients, or None
    per_example  (B, *param.shape) per-example gradients: on ``Request.materialize``, and for
                 small parameters (at most ``DEFER_NUMEL`` numbers in all), whose squared norms
                 the engine then takes when results are read, batched over parameters
    method       how they were computed, for the coverage report
    recompute    optional: rebuilds ``grad`` from factors smaller than it, so the engine need
                 not keep ``grad`` itself (autograd can then adopt it as ``.grad`` uncopied)
    unsure       optional 0-dim bool tensor: the rounding bound of ``sq_norms`` exceeds the
                 rule's tolerance for some example (checked when results are read, no sync)
    factors      on ``Request.factored``: this use's per-example gradient as
                 :class:`~gradnoise.layers.factors.Factors`, for the cross terms between uses
    """

    grad: torch.Tensor
    sq_norms: torch.Tensor | None
    elem_sq: torch.Tensor | None
    per_example: torch.Tensor | None
    method: str
    recompute: Callable[[], torch.Tensor] | None = None
    unsure: torch.Tensor | None = None
    factors: Factors | None = None


# Squared norms in one fused ``vector_norm`` pass (no squared copy). A single float32 reduction
# drifts by ~sqrt(n) eps, ~1e-6 relative at 16k elements but ~1e-5 at 256k, so rows longer than
# SQ_NORM_SHORT are reduced in chunks of SQ_NORM_CHUNK elements and the chunks' squares summed.
SQ_NORM_CHUNK = 1024
SQ_NORM_SHORT = 16384


def batched_sq_norms(tensor: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norms of the rows of a ``(B, *shape)`` tensor, accurately summed."""
    flat = tensor.reshape(tensor.shape[0], -1)
    size = flat.shape[1]
    if size <= SQ_NORM_SHORT:
        return torch.linalg.vector_norm(flat, dim=1).pow(2)
    head = size - size % SQ_NORM_CHUNK
    chunks = flat[:, :head].reshape(flat.shape[0], -1, SQ_NORM_CHUNK)
    total = torch.linalg.vector_norm(chunks, dim=2).pow(2).sum(1)
    if head < size:
        total = total + torch.linalg.vector_norm(flat[:, head:], dim=1).pow(2)
    return total


def sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``||t||^2`` as a 0-dim tensor, summed like :func:`batched_sq_norms`."""
    return batched_sq_norms(tensor.reshape(1, -1))[0]


# The Gram form of ||W_i||^2 sums products (a_t . a_s)(g_t . g_s) over pairs of positions, whose
# magnitudes add up to at most U_i = (sum_t |a_t| |g_t|)^2, so its rounding error is at most about
# eps U_i. When positions' gradients cancel, ||W_i||^2 << U_i and that error dominates (58-99% seen
# in float32, where bmm is exact to 1e-5): such examples are flagged above GRAM_TOLERANCE.
GRAM_TOLERANCE = 1e-2


def gram_unsure(norm_products: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor | None:
    """0-dim bool: some example's Gram norm may be off by more than ``GRAM_TOLERANCE``.

    ``norm_products``: ``(B, ...)`` products ``|a_t| |g_t|`` over each example's positions.
    """
    eps = torch.finfo(sq_norms.dtype).eps
    if eps < 1e-10:
        return None  # float64: the bound is far below any budget
    bound = norm_products.flatten(1).sum(1).pow(2)
    return (eps * bound > GRAM_TOLERANCE * sq_norms).any()


# Per-example gradients of at most this many numbers (a norm layer's (B, C)) are handed over
# whole: their squared norms cost one small op each here, and one op per group of equal shapes
# when the engine takes them at the end (stats/accumulate.py, settle).
DEFER_NUMEL = 1 << 16


def rebuilt(build: Callable[[], torch.Tensor], *sources: torch.Tensor) -> Callable[[], Any]:
    """``build`` as a ``Pieces.recompute`` that refuses to run once one of the tensors it reads
    (a layer input kept past backward) was changed in place."""
    versions = [source._version for source in sources]

    def recompute() -> torch.Tensor:
        if any(s._version != v for s, v in zip(sources, versions, strict=True)):
            raise GradNoiseError(
                explain(
                    "GradStats.moments()",
                    expected="the block's layer inputs unchanged until the summed gradients "
                    "are read",
                    got="a layer input changed in place after backward (the summed gradient "
                    "of a parameter is rebuilt from it)",
                    fix="read stats.moments() before reusing the input buffers",
                )
            )
        return build()

    return recompute


def pieces_from_per_example(per_example: torch.Tensor, request: Request, method: str) -> Pieces:
    """Reduce materialized per-example gradients ``(B, *shape)`` to the pieces a request needs
    (small ones are handed over whole, their reductions left to the engine)."""
    if request.materialize or per_example.numel() <= DEFER_NUMEL:
        return Pieces(per_example.sum(0), None, None, per_example, method)
    return settled(Pieces(per_example.sum(0), None, None, per_example, method), request)


# Per-example gradients materialized only to be reduced (bmm paths) go into one buffer per thread,
# device and dtype that is kept between calls and blocks: a fresh CPU tensor of a few MB often
# comes back from the kernel page by page (one fault per 4 KiB; 9,000 faults and ~1.7x the bmm
# time per ViT step on this project's CPU, whatever glibc's thresholds). Buffers up to
# SCRATCH_KEEP_BYTES are kept; CUDA's caching allocator already recycles memory.
SCRATCH_KEEP_BYTES = 64 * 2**20
_scratch = threading.local()


def scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized 1-D buffer of ``numel`` elements of ``like``'s dtype and device, reused
    across calls on CPU (its contents are overwritten by the next caller: never hand it out)."""
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes > SCRATCH_KEEP_BYTES:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(like.dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[like.dtype] = torch.empty(numel, dtype=like.dtype, device="cpu")
    return buffer[:numel]


def chunked_pieces(
    batch: int,
    shape: tuple[int, ...],
    like: torch.Tensor,
    fill: Callable[[int, int, torch.Tensor], object],
    request: Request,
    method: str,
    chunk_bytes: int,
) -> Pieces:
    r"""Pieces of per-example gradients :math:`W_i` (``shape`` each) made chunk by chunk:
    ``fill(start, stop, out)`` writes examples ``start:stop`` into ``out`` of shape
    ``(stop - start, *shape)``. Returns :math:`\sum_i W_i`, :math:`\|W_i\|^2` and, if asked,
    :math:`\sum_i W_i^{\circ 2}`; chunks of at most ``chunk_bytes`` (one example at least) share
    one reused buffer, so nothing of batch size is allocated."""
    per_example = math.prod(shape)
    chunk = min(batch, max(1, chunk_bytes // (per_example * like.element_size())))
    buffer = scratch(chunk * per_example, like)
    grad = elem_sq = None
    sq_norms = []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        out = buffer[: (stop - start) * per_example].view(stop - start, *shape)
        fill(start, stop, out)
        part = out.sum(0)
        grad = part if grad is None else grad.add_(part)
        sq_norms.append(batched_sq_norms(out))
        if request.elementwise:
            part = out.square_().sum(0)  # the buffer is ours: square it in place
            elem_sq = part if elem_sq is None else elem_sq.add_(part)
    norms = sq_norms[0] if len(sq_norms) == 1 else torch.cat(sq_norms)
    return Pieces(grad, norms, elem_sq, None, method)


def settled(pieces: Pieces, request: Request) -> Pieces:
    """``pieces`` with the squared norms (and elementwise squares) of handed-over per-example
    gradients taken now, for callers that combine pieces themselves (chunks, factors)."""
    if pieces.per_example is None or request.materialize:
        return pieces
    per_example = pieces.per_example
    elem_sq = per_example.pow(2).sum(0) if request.elementwise else None
    return dataclasses.replace(
        pieces, sq_norms=batched_sq_norms(per_example), elem_sq=elem_sq, per_example=None
    )


class Rule(Protocol):
    """One family of torch functions, declared once (see the module docstring).

    Declarations (class attributes):

    * ``name``: shown in errors; ``intercepts``: the torch functions routed to the rule, as a
      ``TorchFunctionMode`` sees them (``F.linear``, ``torch._C.TensorBase.mul``, ...);
    * ``param_roles``: bound arguments that may hold tracked parameters;
    * ``batched_input``: the bound argument that carries the examples on dim 0 (the engine checks
      its size against the batch, and expands it when it is broadcast over the batch);
    * ``gives_input_grad``: the rule also computes the input gradient (:meth:`input_grad`), so
      the op runs as one autograd node; otherwise the engine attaches its backward to the op's
      output;
    * ``broadcasts``: an input with dim 0 of size 1 may be broadcast over a batch (a ``(1, T)``
      position index): the engine expands the output to the batch, so the output gradient keeps
      every example's rows;
    * ``reads_in_backward``: the bound tensors backward reads (``None``: all of them); the engine
      refuses in-place changes of those between forward and backward, as PyTorch does for its
      saved tensors;
    * ``modules``: module types whose forward uses their own parameters only through this rule
      (``nn.Linear`` for ``F.linear``), matched by exact type; the engine need not watch their
      calls for a fallback, which saves two hooks per call;
    * ``factored_roles``: roles whose pieces carry :class:`~gradnoise.layers.factors.Factors`
      on a ``Request.factored``; a parameter shared by such uses only (tied embedding and head)
      gets cross terms instead of materialized per-example gradients.
    """

    name: str
    intercepts: tuple[Callable[..., Any], ...]
    param_roles: tuple[str, ...]
    batched_input: str
    gives_input_grad: bool
    broadcasts: bool
    reads_in_backward: tuple[str, ...] | None
    modules: tuple[type, ...]
    factored_roles: tuple[str, ...]

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Name every argument of the functional call, defaults filled in."""

    def batched_arg(self, roles: tuple[str, ...]) -> str | None:
        """The bound argument with the examples, given which roles hold tracked parameters."""

    def count_examples(
        self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None
    ) -> int:
        """How many examples this call sees (``batch``: the block's, if known already)."""

    def check(self, bound: dict[str, Any], roles: tuple[str, ...]) -> None:
        """Raise a clear error for calls the rule cannot measure (before anything runs)."""

    def contract_cases(self) -> list[tuple[str, Any, tuple[torch.Tensor, ...]]]:
        """``(label, module, inputs)`` in float64 whose forward calls the rule's functions on the
        module's own parameters; the contract test checks each against the reference loop."""

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        """Run the op (the engine has already replaced tracked parameters with detached ones)."""

    def applies(self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None) -> bool:
        """Whether this call is the rule's to measure; a use it declines goes to the fallback."""

    def input_grad(
        self, bound: dict[str, Any], grad_output: torch.Tensor, roles: tuple[str, ...]
    ) -> torch.Tensor | None:
        """The gradient of the batched argument (only when ``gives_input_grad``)."""

    def backward(
        self,
        bound: dict[str, Any],
        grad_output: torch.Tensor,
        roles: tuple[str, ...],
        request: Request,
    ) -> dict[str, Pieces]:
        """Pieces for each requested parameter role, from the call's arguments and output grad."""


class BaseRule:
    """Defaults of the declarations: the batch on dim 0 of ``input``, no extra checks."""

    batched_input = "input"
    gives_input_grad = False
    broadcasts = False
    reads_in_backward: tuple[str, ...] | None = None
    modules: tuple[type, ...] = ()
    factored_roles: tuple[str, ...] = ()

    def batched_arg(self, roles: tuple[str, ...]) -> str | None:
        return self.batched_input

    def applies(self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None) -> bool:
        return True

    def count_examples(
        self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None
    ) -> int:
        tensor = bound[self.batched_arg(roles)]
        return tensor.shape[0] if tensor.dim() > 0 else 0

    def check(self, bound: dict[str, Any], roles: tuple[str, ...]) -> None:
        """Accept every call; rules with unmeasurable options override this."""


_RULES: dict[Callable[..., Any], Rule] = {}


def register(rule: Rule, *functions: Callable[..., Any]) -> Rule:
    """Route calls of ``rule.intercepts`` (or of ``functions``, which then become its
    ``intercepts``) to ``rule``, as a TorchFunctionMode sees them."""
    if functions:
        rule.intercepts = tuple(functions)
    for function in rule.intercepts:
        if function in _RULES and _RULES[function] is not rule:
            raise ValueError(f"{function} is already handled by rule {_RULES[function].name!r}")
        _RULES[function] = rule
    return rule


def rule_for(function: Callable[..., Any]) -> Rule | None:
    """The rule registered for a torch function, or None."""
    return _RULES.get(function)


def require_batched(rule_name: str, tensor: torch.Tensor, min_dims: int, example: str) -> None:
    """Raise for an unbatched call (``F.linear`` on a 1-d vector, ``conv2d`` on ``(C, H, W)``):
    its dim 0 is not the examples."""
    if tensor.dim() < min_dims:
        raise GradNoiseError(
            explain(
                f"GradStats ({rule_name})",
                expected=f"a batch with the examples on dim 0, {example}",
                got=f"an unbatched input of shape {tuple(tensor.shape)}",
                fix="add the batch dim (x.unsqueeze(0) for a single example)",
            )
        )


def plain_module_types() -> frozenset[type]:
    """Module types every rule declares as measured by it alone (see ``Rule.modules``)."""
    return frozenset(t for rule in registered_rules() for t in getattr(rule, "modules", ()))


def registered_rules() -> list[Rule]:
    """Every registered rule, once each, in registration order."""
    return list(dict.fromkeys(_RULES.values()))
