r"""Advantages and baselines as pure functions of a (prompts x samples) reward layout.

Every function takes ``rewards`` as a dense ``(P, G)`` tensor or a flat ``(N,)`` tensor with
``sizes`` (ragged groups, see :mod:`gradnoise.rl.groups`) and returns advantages in the same
layout. Notation: group ``p`` has rewards ``r_1..r_n`` with mean ``mean_p`` and standard deviation
``std_p`` (Bessel-corrected, as TRL computes it). A policy-gradient step then uses
``sum_i A_i grad log pi(o_i | q_p)``; a baseline ``b`` keeps it unbiased when ``b`` does not depend
on ``o_i``, which RLOO satisfies exactly and the group mean satisfies up to an ``O(1/n)`` factor.

Singleton groups (``n_p = 1``) carry no within-group signal and get advantage 0 everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.groups import as_groups, check_rewards, group_mean, group_std, group_sum

__all__ = [
    "bnpo_advantages",
    "dr_grpo_advantages",
    "fit_beta",
    "global_baseline_advantages",
    "grpo_advantages",
    "opo_advantages",
    "rloo_advantages",
    "tracker_advantages",
]

Sizes = Sequence[int] | torch.Tensor | None


def grpo_advantages(
    rewards: torch.Tensor, sizes: Sizes = None, *, eps: float = 1e-4
) -> torch.Tensor:
    r"""GRPO: ``A_i = (r_i - mean_p) / (std_p + eps)`` (Shao et al. 2024, DeepSeekMath, eq. 4).

    ``std_p`` is Bessel-corrected and ``eps = 1e-4`` is added to it, exactly as TRL's
    ``GRPOTrainer`` with ``scale_rewards="group"`` does; a zero-variance group gets 0.
    """
    groups = as_groups(rewards, sizes, where="grpo_advantages")
    centred = groups.flat - groups.broadcast(group_mean(groups))
    return groups.like_input(centred / (groups.broadcast(group_std(groups)) + eps))


def dr_grpo_advantages(rewards: torch.Tensor, sizes: Sizes = None) -> torch.Tensor:
    r"""Dr. GRPO: ``A_i = r_i - mean_p``, no std scaling (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", sec. 3.2): dividing by ``std_p`` up-weights near-solved and
    near-hopeless prompts, a question-level difficulty bias. Equals TRL's ``scale_rewards="none"``.
    """
    groups = as_groups(rewards, sizes, where="dr_grpo_advantages")
    return groups.like_input(groups.flat - groups.broadcast(group_mean(groups)))


def rloo_advantages(rewards: torch.Tensor, sizes: Sizes = None) -> torch.Tensor:
    r"""RLOO: ``A_i = r_i - (S_p - r_i) / (n_p - 1) = n_p/(n_p - 1) (r_i - mean_p)``.

    The leave-one-out baseline is independent of ``o_i``, so the estimate is exactly unbiased
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024).
    Singleton groups get 0.
    """
    groups = as_groups(rewards, sizes, where="rloo_advantages")
    n = groups.broadcast(groups.sizes).to(groups.flat.dtype)
    loo = (groups.broadcast(group_sum(groups, groups.flat)) - groups.flat) / (n - 1).clamp(min=1)
    return groups.like_input(torch.where(n > 1, groups.flat - loo, torch.zeros_like(loo)))


def opo_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor, sizes: Sizes = None
) -> torch.Tensor:
    r"""OPO optimal baseline: ``b_p = sum_i l_i r_i / sum_i l_i``, ``A_i = r_i - b_p``.

    Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline": the variance-minimising baseline
    is ``E[||grad log pi||^2 r] / E[||grad log pi||^2]``; taking the squared score norm
    proportional to the response length ``l_i`` gives the length-weighted mean above.
    """
    groups = as_groups(rewards, sizes, where="opo_advantages")
    lengths = torch.as_tensor(lengths, dtype=groups.flat.dtype).reshape(-1)
    if lengths.shape != groups.flat.shape or (lengths <= 0).any():
        raise GradNoiseError(
            explain(
                "opo_advantages(lengths)",
                expected=f"{groups.flat.numel()} positive response lengths, one per reward",
                got=f"shape {tuple(lengths.shape)}, values {lengths.tolist()[:8]}",
                fix="pass the number of generated tokens of every response, in the reward layout",
            )
        )
    baseline = group_sum(groups, lengths * groups.flat) / group_sum(groups, lengths)
    return groups.like_input(groups.flat - groups.broadcast(baseline))


def fit_beta(pass_rates: torch.Tensor) -> tuple[float, float]:
    r"""Method-of-moments Beta fit ``(a, b)`` of per-prompt pass rates ``p`` in ``[0, 1]``.

    With mean ``m`` and variance ``v`` of ``p``: ``c = m (1 - m) / v - 1``, ``a = m c``,
    ``b = (1 - m) c``. A degenerate batch (``v = 0`` or ``c <= 0``) gives the uniform ``(1, 1)``.
    """
    p = pass_rates.double()
    m, v = p.mean().item(), p.var(correction=0).item() if p.numel() > 1 else 0.0
    c = m * (1 - m) / v - 1 if v > 0 else -1.0
    return (m * c, (1 - m) * c) if c > 0 and 0 < m < 1 else (1.0, 1.0)


def bnpo_advantages(
    rewards: torch.Tensor,
    sizes: Sizes = None,
    *,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    r"""BNPO: ``A_i = (r_i - p) / f(p; alpha, beta)`` with ``f`` the Beta density, ``p = mean_p``.

    Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization", for binary rewards. The
    paper's variance-minimising choice is ``alpha = 1 + a/3``, ``beta = 1 + b/3`` where
    ``Beta(a, b)`` models the pass rates ``p``; when ``alpha``/``beta`` are not given we fit
    ``(a, b)`` to this batch's group means by moments (:func:`fit_beta`); the paper tracks them
    across training, which a caller can do by passing its own running values. ``alpha = beta = 1``
    is REINFORCE with the group-mean baseline, and ``alpha = beta = 3/2`` is GRPO up to the
    constant ``B(3/2, 3/2) = pi/8``. Zero-variance groups (``p`` in ``{0, 1}``) get 0.
    """
    groups = as_groups(rewards, sizes, where="bnpo_advantages")
    check_rewards(groups.flat, where="bnpo_advantages", reward_range=(0.0, 1.0))
    p = group_mean(groups)
    if alpha is None or beta is None:
        a, b = fit_beta(p)
        alpha, beta = 1 + a / 3, 1 + b / 3
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    inner = (p > 0) & (p < 1)
    safe = p.clamp(1e-12, 1 - 1e-12)
    density = torch.exp((alpha - 1) * safe.log() + (beta - 1) * (1 - safe).log() - log_norm)
    scale = torch.where(inner, 1 / density, torch.zeros_like(p))
    return groups.like_input((groups.flat - groups.broadcast(p)) * groups.broadcast(scale))


def global_baseline_advantages(
    rewards: torch.Tensor,
    sizes: Sizes = None,
    *,
    prompt_means: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    r"""Global-statistics advantage: ``A_i = (r_i - mu_p) / (sigma_batch + eps)``.

    As in Reinforce-Ada (Xiong et al. 2025): after adaptive sampling, ``mu_p`` is the mean of
    *all* responses collected for prompt ``p`` (pass ``prompt_means``; default the group mean) and
    the scale is the standard deviation of the whole batch rather than of each group, so a
    prompt with few successes is not blown up by a tiny ``std_p``. Equals TRL's
    ``scale_rewards="batch"`` when ``prompt_means`` is the group mean.
    """
    groups = as_groups(rewards, sizes, where="global_baseline_advantages")
    mu = group_mean(groups) if prompt_means is None else torch.as_tensor(prompt_means)
    if mu.shape != (groups.num_groups,):
        raise GradNoiseError(
            explain(
                "global_baseline_advantages(prompt_means)",
                expected=f"one mean per group, shape ({groups.num_groups},)",
                got=f"shape {tuple(mu.shape)}",
                fix="pass the mean reward of every prompt over all its collected responses",
            )
        )
    sigma = groups.flat.std() if groups.flat.numel() > 1 else torch.zeros(())
    return groups.like_input((groups.flat - groups.broadcast(mu.to(groups.flat))) / (sigma + eps))


def tracker_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    sizes: Sizes = None,
    *,
    normalize: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    r"""SPO-style advantage: ``A_i = r_i - v(q_p)`` from a persistent per-prompt value tracker,
    then (by default) standardised over the whole batch, ``(A - mean(A)) / (std(A) + eps)``.

    Xu et al. 2025, "Single-stream Policy Optimization": the baseline comes from history (see
    :class:`gradnoise.rl.tracker.ValueTracker`), so it works with one sample per prompt and never
    collapses a group to zero signal; batch-level normalisation replaces the per-group std.
    """
    groups = as_groups(rewards, sizes, where="tracker_advantages")
    values = torch.as_tensor(values, dtype=groups.flat.dtype).reshape(-1)
    if values.shape != (groups.num_groups,):
        raise GradNoiseError(
            explain(
                "tracker_advantages(values)",
                expected=f"one tracked value per group, shape ({groups.num_groups},)",
                got=f"shape {tuple(values.shape)}",
                fix="call ValueTracker.values(prompt_ids) with one id per group",
            )
        )
    adv = groups.flat - groups.broadcast(values)
    if normalize and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + eps)
    return groups.like_input(adv)
