r"""Advantages and baselines as pure functions of a (prompts x samples) reward layout.

Every function takes ``rewards`` as a dense ``(P, G)`` tensor or a flat ``(N,)`` tensor with
``sizes`` (ragged groups, see :mod:`gradnoise.rl.groups`) and returns advantages in the same
layout. Notation: group ``p`` has rewards ``r_1..r_n`` with mean ``mean_p`` and standard deviation
``std_p`` (Bessel-corrected, as TRL computes it). A policy-gradient step then uses
``sum_i A_i grad log pi(o_i | q_p)``; a baseline ``b`` keeps it unbiased when ``b`` does not depend
on ``o_i``, which RLOO satisfies exactly and the group mean satisfies up to an ``O(1/n)`` factor.

Singleton groups (``n_p = 1``) carry no within-group signal and get advantage 0 everywhere.

Precision and dtype: everything is computed in float64 on rewards scaled by their largest
magnitude and centred before squaring, so a constant group gets exactly 0 at any reward level
and no reward that float64 holds overflows an intermediate. The result comes back in the
rewards' floating dtype (the default dtype for integer/bool rewards and lists) when it fits;
one that does not fit (e.g. float32 RLOO advantages beyond 3.4e38) raises ``GradNoiseError``
rather than coming back as inf: pass float64 rewards to get it. Arguments (``eps``, ``sizes``,
lengths, baselines, Beta shapes) are validated first; NaN is refused everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.checks import as_real_tensor, check_real
from gradnoise.rl.groups import (
    as_groups,
    check_rewards,
    group_max_abs,
    group_mean,
    group_std,
    group_sum,
)

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


def _check_eps(eps, where: str) -> float:
    return check_real(
        eps,
        where=where,
        name="eps",
        lo=0.0,
        fix="pass a small non-negative constant, e.g. eps=1e-4 (the default)",
    )


def _as_float64(value, *, where: str, what: str) -> torch.Tensor:
    """A caller's tensor (or list) of real numbers as float64; junk is a GradNoiseError."""
    tensor = as_real_tensor(
        value,
        where=where,
        what=what,
        listing="a list of numbers",
        fix=f"pass {what} as a float tensor",
    )
    return tensor.to(torch.float64)


def _refuse_non_finite(values: torch.Tensor, *, where: str, what: str, fix: str) -> None:
    if not torch.isfinite(values).all():
        flat = values.reshape(-1)
        bad = torch.nonzero(~torch.isfinite(flat)).reshape(-1)[:5].tolist()
        raise GradNoiseError(
            explain(
                where,
                expected=f"finite {what}",
                got=f"NaN or infinite values at positions {bad} (first: {flat[bad[0]].item()})",
                fix=fix,
            )
        )


def _batch_scale(*tensors: torch.Tensor) -> float:
    """The largest magnitude over ``tensors`` (1 if all are zero): a scale that
    keeps batch sums and squares of ``tensor / scale`` from overflowing."""
    top = max((t.abs().max().item() for t in tensors if t.numel()), default=0.0)
    return top if top > 0 else 1.0


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (with one correction pass) and Bessel standard deviation of a flat tensor of
    values in [-2, 2]; the std of a single value is 0. Equal values have exactly zero std."""
    n = x.numel()
    mean = x.sum() / n
    mean = mean + (x - mean).sum() / n
    if n < 2:
        return mean, torch.zeros((), dtype=x.dtype, device=x.device)
    return mean, ((x - mean).pow(2).sum() / (n - 1)).sqrt()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (a zero-spread group with ``eps = 0``)."""
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def grpo_advantages(
    rewards: torch.Tensor, sizes: Sizes = None, *, eps: float = 1e-4
) -> torch.Tensor:
    r"""GRPO: ``A_i = (r_i - mean_p) / (std_p + eps)`` (Shao et al. 2024, DeepSeekMath, eq. 4).

    ``std_p`` is Bessel-corrected and ``eps = 1e-4`` is added to it, exactly as TRL's
    ``GRPOTrainer`` with ``scale_rewards="group"`` does; a zero-variance group gets 0 (exactly,
    at any reward level: statistics are computed in float64 on centred, scaled rewards).
    ``eps`` must be finite and ``>= 0``; with ``eps = 0`` a zero-variance group still gets 0.
    """
    eps = _check_eps(eps, "grpo_advantages")
    groups = as_groups(rewards, sizes, where="grpo_advantages")
    scale = groups.broadcast(group_max_abs(groups))
    x = groups.flat / scale
    centred = x - groups.broadcast(group_mean(groups, x))
    # (r - mean) / (std + eps) = (x - mean_x) / (std_x + eps / scale), with |x| <= 1
    denom = groups.broadcast(group_std(groups, x)) + eps / scale
    return groups.like_input(_ratio(centred, denom))


def dr_grpo_advantages(rewards: torch.Tensor, sizes: Sizes = None) -> torch.Tensor:
    r"""Dr. GRPO: ``A_i = r_i - mean_p``, no std scaling (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", sec. 3.2): dividing by ``std_p`` up-weights near-solved and
    near-hopeless prompts, a question-level difficulty bias. Equals TRL's ``scale_rewards="none"``.
    """
    groups = as_groups(rewards, sizes, where="dr_grpo_advantages")
    scale = groups.broadcast(group_max_abs(groups))
    x = groups.flat / scale
    return groups.like_input(scale * (x - groups.broadcast(group_mean(groups, x))))


def rloo_advantages(rewards: torch.Tensor, sizes: Sizes = None) -> torch.Tensor:
    r"""RLOO: ``A_i = r_i - (S_p - r_i) / (n_p - 1) = n_p/(n_p - 1) (r_i - mean_p)``.

    The leave-one-out baseline is independent of ``o_i``, so the estimate is exactly unbiased
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024).
    Singleton groups get 0. Computed as the right-hand side, so ``S_p`` never overflows.
    """
    groups = as_groups(rewards, sizes, where="rloo_advantages")
    scale = groups.broadcast(group_max_abs(groups))
    x = groups.flat / scale
    n = groups.broadcast(groups.sizes).to(x.dtype)
    centred = (x - groups.broadcast(group_mean(groups, x))) * (n / (n - 1).clamp(min=1))
    return groups.like_input(torch.where(n > 1, scale * centred, torch.zeros_like(centred)))


def opo_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor, sizes: Sizes = None
) -> torch.Tensor:
    r"""OPO optimal baseline: ``b_p = sum_i l_i r_i / sum_i l_i``, ``A_i = r_i - b_p``.

    Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline": the variance-minimising baseline
    is ``E[||grad log pi||^2 r] / E[||grad log pi||^2]``; taking the squared score norm
    proportional to the response length ``l_i`` gives the length-weighted mean above. The
    lengths must be finite and positive (a NaN length would make its group's baseline NaN).
    """
    groups = as_groups(rewards, sizes, where="opo_advantages")
    where = "opo_advantages(lengths)"
    lengths = _as_float64(lengths, where=where, what="response lengths").reshape(-1)
    lengths = lengths.to(groups.flat.device)
    bad = lengths.shape != groups.flat.shape or not bool(torch.isfinite(lengths).all())
    if bad or (lengths <= 0).any():
        raise GradNoiseError(
            explain(
                where,
                expected=f"{groups.flat.numel()} finite positive response lengths, one per reward",
                got=f"shape {tuple(lengths.shape)}, values {lengths.tolist()[:8]}",
                fix="pass the number of generated tokens of every response, in the reward layout",
            )
        )
    scale = groups.broadcast(group_max_abs(groups))
    x = groups.flat / scale
    weights = lengths / groups.broadcast(group_max_abs(groups, lengths))  # in (0, 1], max 1
    baseline = group_sum(groups, weights * x) / group_sum(groups, weights)
    return groups.like_input(scale * (x - groups.broadcast(baseline)))


def fit_beta(pass_rates: torch.Tensor) -> tuple[float, float]:
    r"""Method-of-moments Beta fit ``(a, b)`` of per-prompt pass rates ``p`` in ``[0, 1]``.

    With mean ``m`` and variance ``v`` of ``p``: ``c = m (1 - m) / v - 1``, ``a = m c``,
    ``b = (1 - m) c``. A degenerate batch (``v = 0`` or ``c <= 0``) gives the uniform ``(1, 1)``.
    """
    p = _as_float64(pass_rates, where="fit_beta", what="pass rates").reshape(-1)
    if p.numel() == 0 or not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise GradNoiseError(
            explain(
                "fit_beta",
                expected="at least one pass rate, all finite and in [0, 1]",
                got=f"{p.numel()} values {p.tolist()[:8]}",
                fix="pass the per-prompt mean of binary (or [0, 1]) rewards",
            )
        )
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

    Give both ``alpha`` and ``beta`` (finite, ``> 0``: the Beta density is undefined otherwise)
    or neither.
    """
    where = "bnpo_advantages"
    if (alpha is None) != (beta is None):
        raise GradNoiseError(
            explain(
                where,
                expected="both alpha and beta, or neither (then both are fitted)",
                got=f"alpha={alpha!r}, beta={beta!r}",
                fix="pass the other Beta shape too, or drop both to fit them to this batch",
            )
        )
    fix = "pass Beta shapes > 0, e.g. 1 + a/3 and 1 + b/3 of a Beta(a, b) fit of the pass rates"
    if alpha is not None:
        alpha = check_real(alpha, where=where, name="alpha", lo=0.0, lo_open=True, fix=fix)
        beta = check_real(beta, where=where, name="beta", lo=0.0, lo_open=True, fix=fix)
    groups = as_groups(rewards, sizes, where=where)
    check_rewards(groups.flat, where=where, reward_range=(0.0, 1.0))
    p = group_mean(groups)
    if alpha is None or beta is None:
        a, b = fit_beta(p)
        alpha, beta = 1 + a / 3, 1 + b / 3
    shapes = torch.tensor([alpha, beta, alpha + beta], dtype=torch.float64, device=p.device)
    lg = torch.lgamma(shapes)  # never raises: an overflow is inf, refused by like_input
    log_norm = lg[0] + lg[1] - lg[2]
    inner = (p > 0) & (p < 1)
    safe = torch.where(inner, p, torch.full_like(p, 0.5))
    log_density = (alpha - 1) * safe.log() + (beta - 1) * torch.log1p(-safe) - log_norm
    scale = torch.where(inner, torch.exp(-log_density), torch.zeros_like(p))  # 1 / f(p)
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
    *all* responses collected for prompt ``p`` (pass ``prompt_means``, finite; default the group
    mean) and the scale is the standard deviation of the whole batch rather than of each group,
    so a prompt with few successes is not blown up by a tiny ``std_p``. Equals TRL's
    ``scale_rewards="batch"`` when ``prompt_means`` is the group mean. A batch of equal rewards
    has ``sigma_batch = 0`` exactly; with ``eps = 0`` it is then refused unless every
    ``r_i = mu_p``.
    """
    where = "global_baseline_advantages"
    eps = _check_eps(eps, where)
    groups = as_groups(rewards, sizes, where=where)
    if prompt_means is None:
        mu = group_mean(groups)
    else:
        mu = _as_float64(prompt_means, where=f"{where}(prompt_means)", what="prompt means")
        mu = mu.to(groups.flat.device)
    if mu.shape != (groups.num_groups,):
        raise GradNoiseError(
            explain(
                f"{where}(prompt_means)",
                expected=f"one mean per group, shape ({groups.num_groups},)",
                got=f"shape {tuple(mu.shape)}",
                fix="pass the mean reward of every prompt over all its collected responses",
            )
        )
    _refuse_non_finite(
        mu,
        where=f"{where}(prompt_means)",
        what="prompt means",
        fix="pass the mean reward of every prompt over all its collected responses",
    )
    scale = _batch_scale(groups.flat, mu)
    x, m = groups.flat / scale, mu / scale
    _, sigma = _mean_std(x)
    numerator = x - groups.broadcast(m)
    denom = sigma + eps / scale
    if denom == 0 and (numerator != 0).any():
        raise GradNoiseError(
            explain(
                where,
                expected="rewards that are not all equal, or eps > 0",
                got="a batch of equal rewards (zero standard deviation) with eps=0",
                fix="keep the default eps=1e-4, or drop batches without spread",
            )
        )
    return groups.like_input(_ratio(numerator, denom))


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
    ``values`` must be finite; ``eps`` finite and ``>= 0``.
    """
    where = "tracker_advantages"
    eps = _check_eps(eps, where)
    groups = as_groups(rewards, sizes, where=where)
    values = _as_float64(values, where=f"{where}(values)", what="tracked values").reshape(-1)
    values = values.to(groups.flat.device)
    if values.shape != (groups.num_groups,):
        raise GradNoiseError(
            explain(
                f"{where}(values)",
                expected=f"one tracked value per group, shape ({groups.num_groups},)",
                got=f"shape {tuple(values.shape)}",
                fix="call ValueTracker.values(prompt_ids) with one id per group",
            )
        )
    _refuse_non_finite(
        values,
        where=f"{where}(values)",
        what="tracked values",
        fix="call ValueTracker.values(prompt_ids), or replace the NaN/inf baselines",
    )
    scale = _batch_scale(groups.flat, values)
    adv = groups.flat / scale - groups.broadcast(values / scale)  # in [-2, 2]
    if normalize and adv.numel() > 1:
        mean, std = _mean_std(adv)
        return groups.like_input(_ratio(adv - mean, (std + eps / scale).expand_as(adv)))
    return groups.like_input(scale * adv)
