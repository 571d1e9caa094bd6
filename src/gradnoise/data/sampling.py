r"""Importance sampling of training examples by their gradient norms, unbiased by reweighting.

Plain minibatch SGD estimates the full-data gradient :math:`\bar g = \frac1N \sum_i g_i` by the
mean of B uniform draws. Drawing example i with probability :math:`p_i` instead and weighting it
by :math:`w_i = 1 / (N p_i)` keeps the estimate unbiased,

.. math::
    \hat g = \frac1B \sum_{b=1}^{B} w_{i_b}\, g_{i_b}, \qquad
    E[\hat g] = \sum_i p_i \frac{g_i}{N p_i} = \bar g,

with (draws with replacement) total variance

.. math::
    \mathrm{tr}\,\mathrm{Var}[\hat g] = \frac1B \Big( \sum_i \frac{\|g_i\|^2}{N^2 p_i}
    - \|\bar g\|^2 \Big),

against :math:`\frac1B (\frac1N \sum_i \|g_i\|^2 - \|\bar g\|^2)` for uniform draws. The
first sum is smallest, by Cauchy-Schwarz, at the optimal proposal
:math:`p_i^\star = \|g_i\| / \sum_j \|g_j\|` (PA&DA; Zhao & Zhang 2015; Katharopoulos & Fleuret
2018), where it equals :math:`(\frac1N \sum_i \|g_i\|)^2`: the reduction is the ratio of the
mean squared norm to the squared mean norm, large when a few examples carry most of the gradient.

The norms move as the model trains, so the sampler works from **stale scores**: each example
keeps the last norm measured for it (optionally smoothed; :meth:`ImportanceSampler.refresh`
re-scores all of them on a schedule), and the proposal is mixed with uniform,

.. math::
    p_i = (1-\lambda)\, \frac{s_i}{\sum_j s_j} + \frac{\lambda}{N}.

Staleness never biases :math:`\hat g` (the weights use the :math:`p_i` the draw was made with);
it costs variance, and the mixing bounds that cost: :math:`w_i \le 1/\lambda`, so
:math:`\sum_i \|g_i\|^2 / (N^2 p_i) \le \frac1\lambda \cdot \frac1N \sum_i \|g_i\|^2`, at worst
1/lambda times uniform's second moment however wrong the scores are. Examples not yet scored get
the mean of the scored ones. Staleness is worst for examples with small scores: they are drawn
rarely (about lambda B / N per step), so their scores are rarely renewed while their gradients
may grow; ``benchmarks/importance_sampling.py`` measures this (scores renewed only on visits can
make the sampler noisier than uniform) against scheduled refreshes. Norms also jitter from step
to step, which no proposal built from past scores follows: on the benchmark's regression task
even each example's RMS norm over a window, taken with hindsight, keeps only ~0.9 of the fresh
optimum's reduction. Fresh scores cost a scoring pass: :mod:`gradnoise.data.presampling` scores a
candidate set at every step.

:func:`importance_sampling_variance` measures both variances from the batch just drawn, with the
per-example norms GradStats gives in the same backward; :func:`exact_sampling_variance` computes
them from every example's norm (a full pass, for checks and benchmarks).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from gradnoise.errors import GradNoiseError, explain, require

__all__ = [
    "ImportanceSampler",
    "SamplingVariance",
    "exact_sampling_variance",
    "importance_sampling_variance",
]


@dataclass(frozen=True)
class SamplingVariance:
    r"""Trace variance of the minibatch mean gradient at batch size ``batch_size`` under the
    importance proposal and under uniform sampling (both with replacement), and their ratio
    ``reduction = uniform / importance`` (> 1: the importance sampler is less noisy)."""

    importance: float
    uniform: float
    batch_size: int

    @property
    def reduction(self) -> float:
        return self.uniform / self.importance if self.importance > 0 else math.nan


class ImportanceSampler(Sampler[list[int]]):
    r"""A batch sampler drawing examples with probability :math:`p_i` mixed from their scores.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``; each batch of indices comes with its
    importance weights :math:`w_i = 1/(N p_i)` from :meth:`weights`, which the loss must apply
    (``(weights * losses).mean()``) for the gradient to stay unbiased. After the backward, pass
    the batch's per-example gradient norms (or losses, or any score) to :meth:`update`.

    ``mix`` is :math:`\lambda`, the uniform share (weights stay <= 1/lambda); ``smoothing`` the
    EMA factor of an example's score over its visits (0: keep the latest); ``num_batches`` the
    batches per pass of the iterator (default N // batch_size). Draws are with replacement.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        mix: float = 0.2,
        smoothing: float = 0.0,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        require(
            isinstance(num_examples, int) and num_examples > 0,
            "ImportanceSampler(num_examples=...)",
            "a positive int",
            repr(num_examples),
            "pass len(dataset)",
        )
        require(
            isinstance(batch_size, int) and batch_size > 0,
            "ImportanceSampler(batch_size=...)",
            "a positive int",
            repr(batch_size),
            "e.g. 32",
        )
        require(
            isinstance(mix, (int, float)) and 0 < mix <= 1,
            "ImportanceSampler(mix=...)",
            "a number in (0, 1] (the uniform share; weights stay <= 1/mix)",
            repr(mix),
            "e.g. 0.2; mix=0 would let a stale zero score give an example infinite weight",
        )
        require(
            isinstance(smoothing, (int, float)) and 0 <= smoothing < 1,
            "ImportanceSampler(smoothing=...)",
            "a number in [0, 1)",
            repr(smoothing),
            "0 keeps each example's latest score; 0.5 averages it with the earlier ones",
        )
        self.num_examples, self.batch_size = num_examples, batch_size
        self.mix, self.smoothing = float(mix), float(smoothing)
        self.num_batches = num_batches if num_batches is not None else num_examples // batch_size
        require(
            isinstance(self.num_batches, int) and self.num_batches > 0,
            "ImportanceSampler(num_batches=...)",
            "a positive int (batches per pass)",
            repr(num_batches),
            "pass num_batches, or a batch_size <= num_examples",
        )
        self.scores = torch.zeros(num_examples, dtype=torch.float64)
        self.scored = torch.zeros(num_examples, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(seed)
        self._pending: deque[tuple[list[int], torch.Tensor]] = deque()

    def __len__(self) -> int:
        return self.num_batches

    def probabilities(self) -> torch.Tensor:
        r"""The (N,) proposal :math:`p_i = (1-\lambda) s_i / \sum_j s_j + \lambda / N`; unscored
        examples count with the mean score, and with no positive score it is uniform."""
        scores = self.scores.clone()
        if bool(self.scored.any()):
            scores[~self.scored] = scores[self.scored].mean()
        total = float(scores.sum())
        uniform = torch.full_like(scores, 1.0 / self.num_examples)
        if not total > 0:
            return uniform
        return (1 - self.mix) * scores / total + self.mix * uniform

    def draw(self) -> tuple[list[int], torch.Tensor]:
        """One batch of indices and their weights 1/(N p_i), without going through the queue."""
        p = self.probabilities()
        picked = torch.multinomial(p, self.batch_size, replacement=True, generator=self.generator)
        return picked.tolist(), 1.0 / (self.num_examples * p[picked])

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            indices, weights = self.draw()
            self._pending.append((indices, weights))
            yield indices

    def weights(self, indices) -> torch.Tensor:
        """The importance weights (float64, shape (B,)) recorded when ``indices`` were drawn.

        Batches are matched in the order drawn (a DataLoader may draw a few ahead); each batch's
        weights are handed out once.
        """
        key = [int(i) for i in indices]
        for position, (drawn, weights) in enumerate(self._pending):
            if drawn == key:
                del self._pending[position]
                return weights
        raise GradNoiseError(
            explain(
                "ImportanceSampler.weights",
                expected="the indices of a batch this sampler drew and whose weights are unused",
                got=f"{len(key)} indices matching none of {len(self._pending)} pending batches",
                fix="pass the batch's indices as drawn (e.g. from a dataset that returns its "
                "index), once per batch; use draw() to take indices and weights together",
            )
        )

    def update(self, indices, scores: torch.Tensor) -> None:
        """Record scores (e.g. per-example gradient norms, >= 0) for the examples ``indices``."""
        index = torch.as_tensor(indices, dtype=torch.long).flatten()
        values = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
        require(
            values.shape == index.shape,
            "ImportanceSampler.update",
            f"one score per index ({index.numel()})",
            f"{values.numel()} scores",
            "pass the batch's (B,) norms, e.g. stats.total_sq_norms().sqrt()",
        )
        require(
            bool(((index >= 0) & (index < self.num_examples)).all()),
            "ImportanceSampler.update",
            f"indices in [0, {self.num_examples})",
            f"range [{int(index.min())}, {int(index.max())}]",
            "pass indices into the dataset the sampler was built for",
        )
        _check_scores(values, "ImportanceSampler.update")
        old = torch.where(self.scored[index], self.scores[index], values)
        self.scores[index] = self.smoothing * old + (1 - self.smoothing) * values
        self.scored[index] = True

    def refresh(self, scores: torch.Tensor) -> None:
        """Replace every example's score at once (a scheduled full pass over the data), which
        ends all staleness; ``update`` then refines them between refreshes."""
        values = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
        require(
            values.numel() == self.num_examples,
            "ImportanceSampler.refresh",
            f"one score per example ({self.num_examples})",
            f"{values.numel()} scores",
            "score the whole dataset, e.g. GradStats norms over it in chunks",
        )
        _check_scores(values, "ImportanceSampler.refresh")
        self.scores = values.clone()
        self.scored[:] = True

    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "scored": self.scored.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.scores, self.scored = state["scores"].clone(), state["scored"].clone()
        self.generator.set_state(state["generator"])


def _check_scores(values: torch.Tensor, where: str) -> None:
    require(
        bool(torch.isfinite(values).all() and (values >= 0).all()),
        where,
        "finite scores >= 0",
        f"min {float(values.min()):.3g}, non-finite {int((~torch.isfinite(values)).sum())}",
        "pass norms (sqrt of clamped squared norms) or losses, not log-probabilities",
    )


def _as_vector(values, where: str, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().to(torch.float64).flatten()
    require(
        tensor.numel() >= 2 and bool(torch.isfinite(tensor).all()),
        where,
        f"{name}: at least 2 finite numbers",
        f"{tensor.numel()} values, {int((~torch.isfinite(tensor)).sum())} non-finite",
        "pass the (B,) values of one batch",
    )
    return tensor


def importance_sampling_variance(
    sq_norms: torch.Tensor, weights: torch.Tensor, mean_grad_sq_norm: float
) -> SamplingVariance:
    r"""Both variances, estimated without bias from one batch drawn by the importance sampler.

    ``sq_norms`` are the batch's :math:`\|g_{i_b}\|^2` (of the *unweighted* per-example losses),
    ``weights`` the :math:`w_b = 1/(N p_{i_b})` it was drawn with, ``mean_grad_sq_norm`` the
    squared norm :math:`\|\hat g\|^2` of the reweighted batch gradient (what ``.grad`` holds
    after ``(weights * losses).mean().backward()``). With
    :math:`m_p = \frac1B \sum_b w_b^2 \|g_b\|^2` (unbiased for :math:`\sum_i \|g_i\|^2/(N^2 p_i)`),
    :math:`m_u = \frac1B \sum_b w_b \|g_b\|^2` (unbiased for :math:`\frac1N \sum_i \|g_i\|^2`) and
    the unbiased :math:`\widehat{\|\bar g\|^2} = \|\hat g\|^2 - \frac{m_p - \|\hat g\|^2}{B - 1}`,

    .. math::
        \mathrm{importance} = \frac{m_p - \widehat{\|\bar g\|^2}}{B}, \qquad
        \mathrm{uniform} = \frac{m_u - \widehat{\|\bar g\|^2}}{B}.

    One batch is noisy: average the two over steps before taking the ratio.
    """
    where = "importance_sampling_variance"
    norms = _as_vector(sq_norms, where, "sq_norms")
    w = _as_vector(weights, where, "weights")
    require(
        norms.shape == w.shape,
        where,
        "sq_norms and weights of the same length",
        f"{norms.numel()} and {w.numel()}",
        "pass the per-example values of the same batch",
    )
    batch = norms.numel()
    second_importance = float((w * w * norms).mean())
    second_uniform = float((w * norms).mean())
    mean_sq = float(mean_grad_sq_norm)
    grad_sq = mean_sq - (second_importance - mean_sq) / (batch - 1)
    return SamplingVariance(
        importance=(second_importance - grad_sq) / batch,
        uniform=(second_uniform - grad_sq) / batch,
        batch_size=batch,
    )


def exact_sampling_variance(
    sq_norms: torch.Tensor, probabilities: torch.Tensor, full_grad_sq_norm: float, batch_size: int
) -> SamplingVariance:
    r"""Both variances exactly, from every example's :math:`\|g_i\|^2` and the proposal :math:`p`:
    :math:`\frac1B(\sum_i \|g_i\|^2/(N^2 p_i) - \|\bar g\|^2)` and
    :math:`\frac1B(\frac1N\sum_i \|g_i\|^2 - \|\bar g\|^2)`."""
    where = "exact_sampling_variance"
    norms = _as_vector(sq_norms, where, "sq_norms")
    p = _as_vector(probabilities, where, "probabilities")
    require(
        norms.shape == p.shape and bool((p > 0).all()) and abs(float(p.sum()) - 1) < 1e-6,
        where,
        "one probability > 0 per example, summing to 1",
        f"{p.numel()} probabilities for {norms.numel()} examples, sum {float(p.sum()):.6g}",
        "pass sampler.probabilities() and the norms of the same N examples",
    )
    n = norms.numel()
    return SamplingVariance(
        importance=(float((norms / (n * n * p)).sum()) - full_grad_sq_norm) / batch_size,
        uniform=(float(norms.mean()) - full_grad_sq_norm) / batch_size,
        batch_size=batch_size,
    )
