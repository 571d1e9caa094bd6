r"""Gradient Agreement Filtering (Chaubard & Kochenderfer 2024, "Beyond Gradient Averaging in
Parallel Optimization", Algorithm 1), for micro-batches or data-parallel ranks.

Micro-batch gradients :math:`g_1, \dots, g_k` are folded in order into a running sum :math:`s`
(starting at :math:`s = g_1`); :math:`g_i` joins only if it agrees with what was kept so far:

.. math::
    D(s, g_i) = 1 - \frac{\langle s, g_i\rangle}{\|s\|\,\|g_i\|} \le \tau
    \;\Rightarrow\; s \leftarrow s + g_i,\ c \leftarrow c + 1,
    \qquad \text{update direction } s / c.

:math:`D \in [0, 2]`; :math:`\tau = 1` keeps gradients at most orthogonal to the running sum,
:math:`\tau = 2` keeps everything (plain averaging). The paper skips the step when nothing agreed
(:math:`c = 1`); :func:`agreement_filter` reports ``c`` so the caller can. Everything stays in
tensor ops (no host sync). For DDP ranks, ``all_gather`` the flattened rank gradients and pass
them in rank order: every rank then takes the same decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = ["GradientAgreementFilter", "agreement_filter", "cosine_distance"]


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos(a, b)`` of two gradients given as lists of tensors (0 for a zero gradient)."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    norms = torch.sqrt(sum(x.pow(2).sum() for x in a) * sum(y.pow(2).sum() for y in b))
    return 1 - dot / norms.clamp_min(1e-30)


def agreement_filter(
    micro_grads: Sequence[Sequence[torch.Tensor]], *, threshold: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The filtered mean gradient and a bool tensor of which micro-batches were kept."""
    running = [g.clone() for g in micro_grads[0]]
    kept = [torch.ones((), dtype=torch.bool, device=running[0].device)]
    for grads in micro_grads[1:]:
        agree = cosine_distance(running, grads) <= threshold
        for total, g in zip(running, grads, strict=True):
            total.add_(torch.where(agree, g, torch.zeros_like(g)))
        kept.append(agree)
    mask = torch.stack(kept)
    count = mask.sum()
    return [total / count for total in running], mask


class GradientAgreementFilter:
    """Stateful wrapper of :func:`agreement_filter` that counts kept and seen micro-batches."""

    def __init__(self, *, threshold: float = 1.0) -> None:
        if not (isinstance(threshold, int | float) and 0 <= threshold <= 2):
            raise GradNoiseError(
                explain(
                    "GradientAgreementFilter(threshold=...)",
                    expected="a cosine distance in [0, 2]",
                    got=repr(threshold),
                    fix="use e.g. threshold=1.0 (keep gradients at most orthogonal)",
                )
            )
        self.threshold = float(threshold)
        self.kept, self.seen, self.skipped_steps = torch.zeros(()), 0, torch.zeros(())

    def __call__(
        self, micro_grads: Sequence[Sequence[torch.Tensor]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Filter one step's micro-batch gradients; see :func:`agreement_filter`."""
        if len(micro_grads) < 2:
            raise GradNoiseError(
                explain(
                    "GradientAgreementFilter",
                    expected="at least 2 micro-batch (or rank) gradients",
                    got=f"{len(micro_grads)}",
                    fix="split the batch into 2 or more micro-batches",
                )
            )
        mean, mask = agreement_filter(micro_grads, threshold=self.threshold)
        self.kept = self.kept + mask.sum()
        self.seen += len(micro_grads)
        self.skipped_steps = self.skipped_steps + (mask.sum() == 1)
        return mean, mask

    def state_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "kept": self.kept,
            "seen": self.seen,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("threshold") != self.threshold:
            raise GradNoiseError(
                explain(
                    "GradientAgreementFilter.load_state_dict",
                    expected=f"a state saved with threshold={self.threshold}",
                    got=f"threshold={state.get('threshold')!r}",
                    fix="construct the filter with the saved threshold first",
                )
            )
        self.kept, self.seen = state["kept"].clone(), state["seen"]
        self.skipped_steps = state["skipped_steps"].clone()
