r"""Data pruning by per-example scores: which examples to keep when training on a fraction.

Scores come from early training ("Deep Learning on a Data Diet", Paul et al. 2021): GraNd is
the expected per-example gradient norm :math:`E\|\nabla_\theta l_i\|` (``ExampleScores`` stores
its average over visits as ``"grad_norm"``, from GradStats), EL2N the error norm
:math:`\|\mathrm{softmax}(f(x_i)) - e_{y_i}\|_2` (:func:`el2n`), VoG the variance of input
gradients across checkpoints (``"vog"``). :func:`keep_set` turns any of them into the ids to
keep:

* ``"hardest"``: the top ``fraction`` by score (the Data Diet rule), optionally skipping the
  ``skip_hardest`` share at the very top first, where mislabelled examples collect;
* ``"easiest"``: the bottom ``fraction`` (better when little data is kept, Sorscher et al. 2022);
* ``"mixed"``: half of the kept set the hardest, the other half uniformly from the rest;
* ``"random"``: a uniform subset, the baseline every score must beat.

Examples without a defined score (NaN: never visited) count as the median score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.scores import ExampleScores

__all__ = ["RULES", "el2n", "keep_set"]

RULES = ("hardest", "easiest", "mixed", "random")


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""EL2N per example: :math:`\|\mathrm{softmax}(z_i) - e_{y_i}\|_2`, shape (B,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise GradNoiseError(
            explain(
                "el2n",
                expected="logits (B, C) and integer labels (B,)",
                got=f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}",
                fix="pass model(x) for a classifier and its targets",
            )
        )
    probs = logits.detach().float().softmax(-1)
    return (probs - F.one_hot(labels, logits.shape[1]).to(probs)).norm(dim=1)


def _score_vector(scores, score: str | None) -> torch.Tensor:
    if isinstance(scores, ExampleScores):
        if score is None:
            raise GradNoiseError(
                explain(
                    "keep_set",
                    expected="score='grad_norm', 'loss' or 'vog' with an ExampleScores",
                    got="score=None",
                    fix="name the score to prune by, e.g. keep_set(scores, 0.5, score='grad_norm')",
                )
            )
        return scores.values(score).to(torch.float64)
    values = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise GradNoiseError(
            explain(
                "keep_set",
                expected="an ExampleScores or an (N,) tensor of scores",
                got=f"shape {tuple(values.shape)}",
                fix="pass one score per example of the pool",
            )
        )
    return values


def keep_set(
    scores,
    fraction: float,
    *,
    rule: str = "hardest",
    score: str | None = None,
    skip_hardest: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """The sorted ids (long, shape (round(fraction * N),)) of the examples to keep."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise GradNoiseError(
            explain(
                "keep_set fraction",
                expected="a number in (0, 1] (the share of the pool to keep)",
                got=repr(fraction),
                fix="e.g. 0.5 keeps half",
            )
        )
    if rule not in RULES:
        raise GradNoiseError(
            explain(
                "keep_set rule", expected=f"one of {RULES}", got=repr(rule), fix="e.g. 'hardest'"
            )
        )
    if not (isinstance(skip_hardest, (int, float)) and 0 <= skip_hardest < 1 - fraction + 1e-12):
        raise GradNoiseError(
            explain(
                "keep_set skip_hardest",
                expected=f"a share in [0, 1 - fraction] = [0, {1 - fraction:.3g}]",
                got=repr(skip_hardest),
                fix="skip at most what pruning removes, e.g. skip_hardest=0.05",
            )
        )
    values = _score_vector(scores, score if rule != "random" else (score or "grad_norm"))
    n = values.numel()
    keep = max(1, round(fraction * n))
    generator = torch.Generator().manual_seed(seed)
    if rule == "random":
        return torch.randperm(n, generator=generator)[:keep].sort().values
    defined = ~torch.isnan(values)
    filled = values.clone()
    filled[~defined] = values[defined].median() if bool(defined.any()) else 0.0
    # ties broken by a seeded random order, so equal scores do not keep the lowest ids
    jitter = torch.randperm(n, generator=generator)
    order = jitter[torch.sort(filled[jitter], descending=True, stable=True).indices]
    if rule == "easiest":
        return order.flip(0)[:keep].sort().values
    skip = math.floor(skip_hardest * n)
    if rule == "hardest":
        return order[skip : skip + keep].sort().values
    top = keep // 2
    hardest, rest = order[skip : skip + top], torch.cat([order[:skip], order[skip + top :]])
    extra = rest[torch.randperm(rest.numel(), generator=generator)[: keep - top]]
    return torch.cat([hardest, extra]).sort().values
