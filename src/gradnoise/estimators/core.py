r"""The estimator protocol, the :class:`Estimate` record, and the helpers every estimator shares.

Every estimator is a callable

.. code-block:: python

    est(f, dist, num_samples=K, *, generator=None) -> Estimate

that estimates :math:`\nabla_\theta\, E_{x \sim p_\theta}[f(x)]` for the parameters
:math:`\theta` the distribution depends on. ``dist`` is a ``torch.distributions.Distribution``
(or a zero-argument factory of one); ``f`` maps a batch of ``K`` samples to ``K`` per-sample
values. The estimate is the mean of independent *terms* :math:`t_1..t_n` (one per sample, or one
per antithetic pair / QMC replicate), and its variance is reported through the same
:class:`~gradnoise.stats.GradMoments` record the GradStats engine uses, so

.. math::
    \hat g = \frac1n \sum_i t_i,\qquad
    \widehat{\mathrm{Var}}[t]_j = \frac{\sum_i t_{ij}^2 - n \hat g_j^2}{n - 1},\qquad
    \widehat{\mathrm{Var}}[\hat g]_j = \widehat{\mathrm{Var}}[t]_j / n.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.distributions import Distribution

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import elementwise_variance, trace_covariance

__all__ = [
    "Estimate",
    "Estimator",
    "check_num_samples",
    "chunk_sizes",
    "draw",
    "evaluate",
    "finish",
    "per_sample_grads",
    "require_grad_path",
    "resolve",
    "seeded",
]

SampleFn = Callable[[torch.Tensor], torch.Tensor]
DistLike = Distribution | Callable[[], Distribution]


@dataclass(frozen=True)
class Estimate:
    """A gradient estimate with its own second moments.

    ``grads[i]`` estimates the gradient of ``params[i]``; ``moments[i]`` is the GradMoments record
    of the independent terms whose mean ``grads[i]`` is. ``num_samples`` counts the samples drawn
    and ``num_evals`` the evaluations of ``f`` (the cost a comparison charges).
    """

    params: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor, ...]
    moments: tuple[GradMoments, ...]
    num_samples: int
    num_evals: int

    @property
    def variance(self) -> tuple[torch.Tensor, ...]:
        """Elementwise variance of one term, via :func:`gradnoise.stats.elementwise_variance`."""
        return tuple(elementwise_variance(m) for m in self.moments)

    @property
    def variance_of_mean(self) -> tuple[torch.Tensor, ...]:
        """Elementwise variance of the estimate itself: the term variance over ``n`` terms."""
        return tuple(v / m.n for v, m in zip(self.variance, self.moments, strict=True))

    @property
    def total_variance(self) -> float:
        r""":math:`\sum_j \mathrm{Var}[\hat g]_j` over all parameters (trace of the covariance)."""
        return float(sum(trace_covariance(m) / m.n for m in self.moments))


class Estimator(Protocol):
    """Structural type of every estimator: ``est(f, dist, num_samples, *, generator)``."""

    def __call__(
        self,
        f: SampleFn,
        dist: DistLike,
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate: ...


def _tensors_of(dist: Distribution) -> Iterator[torch.Tensor]:
    for value in vars(dist).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, Distribution):
            yield from _tensors_of(value)


def _leaves(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The autograd leaves requiring grad that ``tensor`` depends on, in depth-first order."""
    if tensor.grad_fn is None:
        if tensor.requires_grad:
            yield tensor
        return
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            yield node.variable
        stack.extend(child for child, _ in reversed(node.next_functions))


def resolve(dist: DistLike, what: str) -> tuple[Distribution, tuple[torch.Tensor, ...]]:
    """Build the distribution (calling a factory) and find the leaf parameters it depends on."""
    if not isinstance(dist, Distribution) and callable(dist):
        dist = dist()
    if not isinstance(dist, Distribution):
        raise GradNoiseError(
            explain(
                what,
                expected="a torch.distributions.Distribution or a zero-argument factory of one",
                got=type(dist).__name__,
                fix="pass e.g. torch.distributions.Normal(loc, scale) with loc.requires_grad",
            )
        )
    found: dict[int, torch.Tensor] = {}
    for tensor in _tensors_of(dist):
        for leaf in _leaves(tensor):
            found.setdefault(id(leaf), leaf)
    if not found:
        raise GradNoiseError(
            explain(
                what,
                expected="a distribution whose parameters require grad",
                got=f"{type(dist).__name__} with no parameter that requires grad",
                fix="create the parameters with requires_grad=True (or call .requires_grad_())",
            )
        )
    return dist, tuple(found.values())


def check_num_samples(what: str, num_samples: int, block: int = 1) -> None:
    """A variance needs two independent terms: ``num_samples >= 2 * block``, a multiple of it."""
    ok = isinstance(num_samples, int) and num_samples >= 2 * block and num_samples % block == 0
    if not ok:
        raise GradNoiseError(
            explain(
                f"{what} num_samples",
                expected=f"an int >= {2 * block} and a multiple of {block} "
                "(at least two independent terms, so that a variance exists)",
                got=repr(num_samples),
                fix=f"draw more samples, e.g. num_samples={max(2 * block, 16 // block * block)}",
            )
        )


def evaluate(what: str, f: SampleFn, samples: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Call ``f`` on the batch of samples and insist on one value per sample."""
    values = f(samples)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (num_samples,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise GradNoiseError(
            explain(
                f"{what} f",
                expected=f"a tensor of shape ({num_samples},): one value per sample",
                got=str(got),
                fix="reduce over the event dimensions inside f, e.g. return (x**2).sum(-1)",
            )
        )
    return values


def require_grad_path(
    what: str, values: torch.Tensor, *, sample: str = "samples", alternative: str = "ScoreFunction"
) -> torch.Tensor:
    """Insist that ``f``'s values depend on the (reparameterized or relaxed) samples by autograd.

    Without a gradient path the backward pass fails with a raw autograd error (or, in forward
    mode, gives a silent zero); the cause is an ``f`` that is not differentiable (detach, numpy,
    comparisons, argmax, integer outputs).
    """
    if not values.requires_grad:
        raise GradNoiseError(
            explain(
                f"{what} f",
                expected=f"values differentiable in the {sample} (built from torch ops on them)",
                got=f"a {values.dtype} tensor with no gradient path to the {sample}",
                fix="remove detach / numpy / comparisons / argmax from f, or use "
                f"{alternative}, which only evaluates f",
            )
        )
    return values


CHUNK = 256  # samples per vectorized backward: the cost of one chunk is O(CHUNK * chunk graph)


def chunk_sizes(num_samples: int, block: int) -> list[int]:
    """Split ``num_samples`` into chunks of about :data:`CHUNK`, each a multiple of ``block``."""
    size = max(block, CHUNK // block * block)
    full, rest = divmod(num_samples, size)
    return [size] * full + ([rest] if rest else [])


def per_sample_grads(
    outputs: torch.Tensor, params: Sequence[torch.Tensor], *, retain_graph: bool = True
) -> list[torch.Tensor]:
    """Gradients of each ``outputs[k]`` w.r.t. every parameter, stacked to ``(K, *shape)``.

    One vectorized backward (``is_grads_batched``); unused parameters get zeros. The graph is
    retained by default because chunks share the distribution's own parameter nodes.
    """
    eye = torch.eye(outputs.shape[0], dtype=outputs.dtype, device=outputs.device)
    grads = torch.autograd.grad(
        outputs,
        list(params),
        grad_outputs=eye,
        is_grads_batched=True,
        allow_unused=True,
        retain_graph=retain_graph,
    )
    return [
        torch.zeros((outputs.shape[0], *p.shape), dtype=p.dtype, device=p.device)
        if g is None
        else g.detach()
        for g, p in zip(grads, params, strict=True)
    ]


def finish(
    params: Sequence[torch.Tensor],
    terms: Sequence[torch.Tensor],
    *,
    block: int,
    num_evals: int,
) -> Estimate:
    """Average each block of ``block`` dependent samples into one term; record the moments."""
    num_samples = terms[0].shape[0]
    moments = tuple(
        GradMoments.from_per_example(t.reshape(num_samples // block, block, *t.shape[1:]).mean(1))
        for t in terms
    )
    return Estimate(
        params=tuple(params),
        grads=tuple(m.mean for m in moments),
        moments=moments,
        num_samples=num_samples,
        num_evals=num_evals,
    )


@contextlib.contextmanager
def seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Run the block on a CPU RNG seeded from ``generator``, leaving the global RNG untouched.

    ``torch.distributions`` samplers take no generator, so this is how ``generator=`` reaches them.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def draw(
    kind: str, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``torch.randn`` (``kind="normal"``) or ``torch.rand`` (``"uniform"``) of ``shape`` in
    ``like``'s dtype, on ``like``'s device: drawn where ``generator`` lives (a CPU generator
    for parameters on a GPU is the usual case), then moved."""
    sample = torch.randn if kind == "normal" else torch.rand
    device = like.device if generator is None else generator.device
    return sample(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
