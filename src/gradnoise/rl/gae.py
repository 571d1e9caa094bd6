r"""Generalized advantage estimation, GAE(lambda), as a pure function over (time x batch) tensors.

Schulman, Moritz, Levine, Jordan & Abbeel 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eqs. 11-16. With rewards ``r_t``, critic values ``V_t``, done
masks ``d_t`` (``d_t = 1`` when the episode ended *after* step ``t``, so ``V_{t+1}`` belongs to
the next episode and is not used) for ``t = 0..T-1``, and ``V_T`` the value of the state after
the last step (the ``bootstrap``):

    delta_t = r_t + gamma * V_{t+1} * (1 - d_t) - V_t
    A_t     = delta_t + gamma * lam * (1 - d_t) * A_{t+1},      A_T = 0
    R_t     = A_t + V_t                                           (the critic's target)

``lam = 1`` gives the Monte-Carlo return minus ``V_t`` (bootstrapped with ``V_T`` where the
segment is cut before the episode ends): unbiased for any critic, highest variance. ``lam = 0``
gives the one-step TD error ``delta_t``: lowest variance, biased by the critic's error. In
between, ``A_t = sum_k (gamma lam)^k delta_{t+k}`` inside an episode.

Every column ``b`` of the batch is an independent environment; the recursion runs backwards in
time and never crosses a step with ``d_t = 1``. Computed in float64; results come back in the
rewards' floating dtype (the default dtype for integer/bool rewards).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.checks import as_real_tensor, check_real

__all__ = ["GAE", "gae_advantages"]


class GAE(NamedTuple):
    """``advantages`` ``A_t`` and ``returns`` ``A_t + V_t``, both in the rewards' layout."""

    advantages: torch.Tensor
    returns: torch.Tensor


def _tensor(value, *, where: str, what: str) -> torch.Tensor:
    return as_real_tensor(
        value,
        where=f"{where}({what})",
        what=what,
        listing="a nested list of numbers",
        fix=f"pass {what} as a float tensor of shape (T, B)",
    )


def _finite(tensor: torch.Tensor, *, where: str, what: str) -> torch.Tensor:
    x = tensor.to(torch.float64)
    if not torch.isfinite(x).all():
        flat = x.reshape(-1)
        bad = torch.nonzero(~torch.isfinite(flat)).reshape(-1)[:5].tolist()
        raise GradNoiseError(
            explain(
                f"{where}({what})",
                expected=f"finite {what}",
                got=f"NaN or infinite values at flat positions {bad} "
                f"(first: {flat[bad[0]].item()})",
                fix=f"remove or replace the non-finite {what} before computing advantages",
            )
        )
    return x


def _shape_error(where: str, what: str, expected: str, got: torch.Tensor, fix: str):
    return GradNoiseError(
        explain(f"{where}({what})", expected=expected, got=f"shape {tuple(got.shape)}", fix=fix)
    )


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    bootstrap: torch.Tensor | None = None,
) -> GAE:
    r"""GAE(lambda) advantages and returns of a ``(T, B)`` rollout (Schulman et al. 2016).

    ``delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t`` and
    ``A_t = delta_t + gamma lam (1 - d_t) A_{t+1}`` backwards from ``A_T = 0``; returns
    ``GAE(advantages=A, returns=A + V)``, each of the rewards' shape.

    * ``rewards``: ``(T, B)`` (or ``(T,)`` for one environment: results are then ``(T,)``);
    * ``values``: ``(T, B)`` critic values ``V_0..V_{T-1}`` together with ``bootstrap`` of shape
      ``(B,)``, the value ``V_T`` of the state after the last step; or ``(T + 1, B)`` holding
      ``V_T`` as its last row, with ``bootstrap=None``;
    * ``dones``: ``(T, B)`` booleans or 0/1 numbers, ``1`` where the episode ended after step
      ``t`` (its ``V_{t+1}``, and the advantages after it, are not used);
    * ``gamma``, ``lam``: finite reals in ``[0, 1]``.

    A segment cut mid-episode is bootstrapped with ``V_T``; if it ended in a terminal state, mark
    the last step done (then ``V_T`` is ignored) or pass ``bootstrap=torch.zeros(B)``. All inputs
    must be finite; shapes are checked before anything is computed.
    """
    where = "gae_advantages"
    fix_gl = "pass a discount / GAE parameter between 0 and 1, e.g. gamma=0.99, lam=0.95"
    gamma = check_real(gamma, where=where, name="gamma", lo=0.0, hi=1.0, fix=fix_gl)
    lam = check_real(lam, where=where, name="lam", lo=0.0, hi=1.0, fix=fix_gl)

    r = _tensor(rewards, where=where, what="rewards")
    out_dtype = r.dtype if r.is_floating_point() else torch.get_default_dtype()
    single = r.dim() == 1
    if r.dim() not in (1, 2) or r.shape[0] == 0:
        raise _shape_error(
            where,
            "rewards",
            "a (T, B) tensor with T >= 1 (or (T,) for one environment)",
            r,
            "lay the rollout out as time x environments",
        )
    r2 = r.unsqueeze(1) if single else r
    T, B = r2.shape
    layout = f"({T},)" if single else f"({T}, {B})"

    v = _tensor(values, where=where, what="values")
    v2 = v.unsqueeze(1) if single and v.dim() == 1 else v
    if bootstrap is None:
        if v2.shape != (T + 1, B):
            hint = (
                "pass bootstrap= (the value after the last step, or zeros if it was terminal)"
                if v2.shape == (T, B)
                else f"pass values of shape {layout} with bootstrap=, or one more row of values"
            )
            raise _shape_error(
                where,
                "values",
                f"shape {(T + 1,) if single else (T + 1, B)} (V_0..V_T) when bootstrap is None",
                v,
                hint,
            )
        full = v2
    else:
        if v2.shape != (T, B):
            raise _shape_error(
                where,
                "values",
                f"shape {layout} (V_0..V_(T-1)) when bootstrap is given",
                v,
                "pass one value per reward, or drop bootstrap and pass T + 1 rows of values",
            )
        boot = _tensor(bootstrap, where=where, what="bootstrap")
        boot2 = boot.reshape(1) if single and boot.dim() == 0 else boot
        if boot2.shape != (B,):
            raise _shape_error(
                where,
                "bootstrap",
                f"shape {'()' if single else f'({B},)'}: one value per environment",
                boot,
                "pass the critic's value of the state after the last step of each environment",
            )
        full = torch.cat([v2.to(torch.float64), boot2.to(v2.device, torch.float64).unsqueeze(0)])

    d = _tensor(dones, where=where, what="dones")
    d2 = d.unsqueeze(1) if single and d.dim() == 1 else d
    if d2.shape != (T, B):
        raise _shape_error(
            where, "dones", f"shape {layout}, one flag per reward", d, "pass one done flag per step"
        )
    if d2.dtype != torch.bool:
        df = d2.to(torch.float64)
        if not ((df == 0) | (df == 1)).all():
            odd = df[(df != 0) & (df != 1)].reshape(-1)[:5].tolist()
            raise GradNoiseError(
                explain(
                    f"{where}(dones)",
                    expected="booleans or 0/1 values",
                    got=f"values {odd}",
                    fix="pass done = terminated | truncated as a bool tensor",
                )
            )

    r64 = _finite(r2, where=where, what="rewards")
    v64 = _finite(full, where=where, what="values" if bootstrap is None else "values/bootstrap")
    device = r64.device
    v64 = v64.to(device)
    alive = 1.0 - d2.to(device=device, dtype=torch.float64)

    delta = r64 + gamma * v64[1:] * alive - v64[:-1]
    adv = torch.empty_like(delta)
    running = torch.zeros(B, dtype=torch.float64, device=device)
    for t in range(T - 1, -1, -1):
        running = delta[t] + gamma * lam * alive[t] * running
        adv[t] = running
    ret = adv + v64[:-1]
    for name, x in (("advantages", adv), ("returns", ret)):
        if not torch.isfinite(x.to(out_dtype)).all():
            raise GradNoiseError(
                explain(
                    where,
                    expected=f"{name} that fit in {out_dtype}",
                    got="values beyond its range",
                    fix="pass float64 rewards and values",
                )
            )
    if single:
        adv, ret = adv.squeeze(1), ret.squeeze(1)
    return GAE(adv.to(out_dtype), ret.to(out_dtype))
