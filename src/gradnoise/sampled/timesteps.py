r"""Importance sampling of diffusion timesteps by their measured gradient scale, unbiased.

The training objective averages a per-timestep loss over K buckets of timesteps,
:math:`L = \frac1K \sum_k L_k`. Drawing bucket k with probability :math:`p_k` and weighting the
example by :math:`w_k = 1/(K p_k)` keeps every minibatch gradient unbiased,
:math:`E[w_k \nabla\ell] = \sum_k p_k \frac{1}{K p_k} \nabla L_k = \nabla L`, with (draws
independent) per-example trace variance

.. math::
    \mathrm{tr}\,\Sigma_p = \frac{1}{K^2} \sum_k \frac{m_k}{p_k} - \|\nabla L\|^2,
    \qquad m_k = E_k \|\nabla \ell\|^2,

against :math:`\frac1K \sum_k m_k - \|\nabla L\|^2` for uniform buckets. By Cauchy-Schwarz the
first sum is smallest at :math:`p_k^\star = \sqrt{m_k} / \sum_j \sqrt{m_j}`, where it equals
:math:`(\frac1K \sum_k \sqrt{m_k})^2`: the gain is the ratio of the mean second moment to the
squared mean gradient scale, large when a few noise levels carry most of the gradient.

:class:`TimestepSampler` keeps a running estimate of each :math:`m_k` from the per-example
squared gradient norms GradStats gives in the same backward (:func:`bucket_second_moments`),
and samples from :math:`p_k = (1 - \lambda)\, p_k^\star + \lambda / K`; the uniform share
:math:`\lambda` bounds the weights by :math:`1/\lambda` and keeps every bucket visited (about
:math:`\lambda B / K` examples per batch), so no estimate goes stale for long. Stale estimates
never bias the gradient (the weights use the :math:`p_k` of the draw); they only cost variance.
"""

from __future__ import annotations

import torch

from gradnoise.errors import require

__all__ = ["TimestepSampler", "bucket_sampling_variance", "bucket_second_moments"]


def bucket_second_moments(
    sq_norms: torch.Tensor, buckets: torch.Tensor, num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` per bucket of ``sq_norms`` (``(B,)`` per-example ``||g_i||^2``)."""
    sums = torch.zeros(num_buckets, dtype=torch.float64)
    counts = torch.zeros(num_buckets, dtype=torch.float64)
    index = buckets.detach().cpu().long()
    sums.index_add_(0, index, sq_norms.detach().cpu().to(torch.float64))
    counts.index_add_(0, index, torch.ones_like(sums[index]))
    return sums, counts


def bucket_sampling_variance(second_moments: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{K^2}\sum_k m_k / p_k`: the second moment of one weighted example's
    gradient (subtract :math:`\|\nabla L\|^2` for its trace variance; divide by B for a batch)."""
    k = second_moments.numel()
    return (second_moments.to(torch.float64) / probs.to(torch.float64)).sum() / k**2


class TimestepSampler:
    r"""Samples timestep buckets with :math:`p_k = (1-\lambda)\sqrt{m_k}/\sum_j\sqrt{m_j} +
    \lambda/K` from running estimates of :math:`m_k = E_k\|\nabla\ell\|^2` (module docstring).

    ``sample`` returns the buckets and their weights :math:`1/(K p_k)`; scale each example's
    loss by its weight. After the backward, ``update`` with the per-example squared gradient
    norms (``GradStats.total_sq_norms()`` of the weighted loss, and ``weights=`` the weights used,
    to divide them out). Until every bucket has been seen, the proposal is uniform.

    Args:
        num_buckets: K.
        mix: :math:`\lambda` in (0, 1], the uniform share (weights stay <= 1/mix).
        smoothing: EMA factor in [0, 1) of each bucket's estimate over updates (0: latest batch).
    """

    def __init__(self, num_buckets: int, *, mix: float = 0.2, smoothing: float = 0.9) -> None:
        require(
            isinstance(num_buckets, int) and not isinstance(num_buckets, bool) and num_buckets > 0,
            "TimestepSampler(num_buckets=...)", "a positive int", repr(num_buckets),
            "e.g. 20 buckets of 50 timesteps",
        )  # fmt: skip
        require(
            isinstance(mix, (int, float)) and 0 < mix <= 1, "TimestepSampler(mix=...)",
            "a number in (0, 1] (the uniform share)", repr(mix), "e.g. 0.2",
        )  # fmt: skip
        require(
            isinstance(smoothing, (int, float)) and 0 <= smoothing < 1,
            "TimestepSampler(smoothing=...)", "a number in [0, 1)", repr(smoothing), "e.g. 0.9",
        )  # fmt: skip
        self.num_buckets, self.mix, self.smoothing = num_buckets, float(mix), float(smoothing)
        self.second_moments = torch.full((num_buckets,), float("nan"), dtype=torch.float64)

    @property
    def probs(self) -> torch.Tensor:
        """The current proposal :math:`p_k` (float64, sums to 1)."""
        k = self.num_buckets
        m = self.second_moments
        if bool(m.isnan().any()) or not bool((m > 0).any()):
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        scale = m.clamp_min(0).sqrt()
        return (1 - self.mix) * scale / scale.sum() + self.mix / k

    def sample(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buckets, weights)``: ``batch_size`` i.i.d. buckets and :math:`w = 1/(K p_k)`."""
        require(
            isinstance(batch_size, int) and batch_size > 0, "TimestepSampler.sample(batch_size)",
            "a positive int", repr(batch_size), "pass the number of examples per batch",
        )  # fmt: skip
        probs = self.probs
        buckets = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_buckets * probs[buckets])
        return buckets, weights.to(torch.float32)

    def update(
        self,
        buckets: torch.Tensor,
        sq_norms: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Fold one batch's per-example ``||g_i||^2`` into the bucket estimates.

        With ``weights``, ``sq_norms`` are those of the weighted losses :math:`w_i \\ell_i` and
        are divided by :math:`w_i^2`; buckets absent from the batch keep their estimate.
        """
        require(
            buckets.shape == sq_norms.shape and buckets.dim() == 1,
            "TimestepSampler.update", "buckets and sq_norms of the same shape (B,)",
            f"{tuple(buckets.shape)} and {tuple(sq_norms.shape)}",
            "pass the buckets of the batch and its per-example squared norms",
        )  # fmt: skip
        in_range = bool(((buckets >= 0) & (buckets < self.num_buckets)).all())
        require(
            in_range, "TimestepSampler.update(buckets)", f"bucket ids in [0, {self.num_buckets})",
            f"ids from {int(buckets.min())} to {int(buckets.max())}",
            "pass the buckets that sample() returned",
        )  # fmt: skip
        sq = sq_norms.detach().to(torch.float64)
        if weights is not None:
            sq = sq / weights.detach().to(torch.float64).pow(2)
        sums, counts = bucket_second_moments(sq, buckets, self.num_buckets)
        seen = counts > 0
        batch_mean = sums[seen] / counts[seen]
        old = self.second_moments[seen]
        fresh = old.isnan()
        blended = self.smoothing * old + (1 - self.smoothing) * batch_mean
        self.second_moments[seen] = torch.where(fresh, batch_mean, blended)

    def state_dict(self) -> dict:
        return {"second_moments": self.second_moments.clone(), "mix": self.mix,
                "smoothing": self.smoothing}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.second_moments = state["second_moments"].clone().to(torch.float64)
        self.mix, self.smoothing = float(state["mix"]), float(state["smoothing"])
