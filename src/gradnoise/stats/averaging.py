r"""Weighted averages of per-step estimates and Fieller's interval for their ratio.

:class:`EmaAverage` and :class:`WindowAverage` keep, on the device and without host syncs, the
normalized weighted mean of a per-step vector ``x`` and of a 2x2 outer product ``z z^T``, plus
:math:`\sum_s w_s^2` (the variance factor of a weighted mean of independent steps).
:func:`fieller_interval` turns the means of a numerator and a denominator into an interval for
their ratio (Fieller 1954, "Some problems in interval estimation").
"""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist

import torch

__all__ = ["EmaAverage", "WindowAverage", "ema_sq_weight", "fieller_interval", "student_quantile"]


def ema_sq_weight(beta: float, steps: int) -> float:
    r""":math:`\sum_s w_s^2` of ``steps`` unnormalized EMA weights :math:`(1-\beta)\beta^{t-s}`:
    :math:`(1-\beta)^2 (1 - \beta^{2t}) / (1 - \beta^2)`."""
    return (1 - beta) ** 2 * (1 - beta ** (2 * steps)) / (1 - beta**2)


def _ok(ok: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.bool, device=like.device) if ok is None else ok


class EmaAverage:
    r"""Bias-corrected exponential weights :math:`w_s \propto (1-\beta)\beta^{t-s}`.

    ``push(x, zz, ok)`` with a 0-dim bool ``ok`` that is false leaves the average exactly as it
    was (the step is skipped, not given weight 0 inside the decay); skips are counted. Both are
    tensor ops, so a skip needs no host sync.
    """

    def __init__(self, beta: float) -> None:
        self.beta, self.pushes = beta, 0
        self.good: torch.Tensor | None = None
        self.sq_weight: torch.Tensor | None = None
        self.sum_x: torch.Tensor | None = None
        self.sum_zz: torch.Tensor | None = None

    def push(self, x: torch.Tensor, zz: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        b, ok = self.beta, _ok(ok, x)
        if self.sum_x is None:
            self.sum_x, self.sum_zz = torch.zeros_like(x), torch.zeros_like(zz)
            self.good = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sq_weight = torch.zeros((), dtype=torch.float64, device=x.device)
        self.sum_x = torch.where(ok, b * self.sum_x + (1 - b) * x, self.sum_x)
        self.sum_zz = torch.where(ok, b * self.sum_zz + (1 - b) * zz, self.sum_zz)
        self.sq_weight = torch.where(ok, b * b * self.sq_weight + (1 - b) ** 2, self.sq_weight)
        self.good = self.good + ok
        self.pushes += 1

    @property
    def steps(self) -> int:
        """Steps averaged (skipped ones excluded); one host sync."""
        return 0 if self.good is None else int(self.good)

    @property
    def skipped(self) -> int:
        return self.pushes - self.steps

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Normalized ``(E_w[x], E_w[z z^T], sum_s w_s^2)``."""
        mass = 1 - self.beta**self.steps
        return self.sum_x / mass, self.sum_zz / mass, float(self.sq_weight) / mass**2

    def state(self) -> dict:
        steps = self.steps
        return {
            "steps": steps,
            "skipped": self.pushes - steps,
            "sq_weight": 0.0 if self.sq_weight is None else float(self.sq_weight),
            "x": self.sum_x,
            "zz": self.sum_zz,
        }

    def load(self, state: dict) -> None:
        steps, skipped = state["steps"], state.get("skipped", 0)
        self.pushes = steps + skipped
        self.sum_x, self.sum_zz = state["x"], state["zz"]
        if self.sum_x is None:
            self.good = self.sq_weight = None
            return
        device = self.sum_x.device
        self.good = torch.tensor(float(steps), dtype=torch.float64, device=device)
        self.sq_weight = torch.tensor(state["sq_weight"], dtype=torch.float64, device=device)


class WindowAverage:
    """Equal weights over the last ``size`` pushed steps (the classical batch-means estimator).

    Skipped steps (``ok`` false) keep their place in the window but not in the average.
    """

    def __init__(self, size: int) -> None:
        self.size, self.pushes = size, 0
        self.rows: deque[torch.Tensor] = deque(maxlen=size)
        self.oks: deque[torch.Tensor] = deque(maxlen=size)
        self.good: torch.Tensor | None = None

    def push(self, x: torch.Tensor, zz: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        ok = _ok(ok, x)
        self.rows.append(x)
        self.oks.append(ok)
        self.good = ok.double() if self.good is None else self.good + ok
        self.pushes += 1

    @property
    def steps(self) -> int:
        """Steps averaged over the run (skipped ones excluded); one host sync."""
        return 0 if self.good is None else int(self.good)

    @property
    def skipped(self) -> int:
        return self.pushes - self.steps

    def _good_rows(self) -> torch.Tensor:
        return torch.stack(list(self.rows))[torch.stack(list(self.oks))]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        rows = self._good_rows()
        if len(rows) == 0:  # every step in the window was skipped
            nan = torch.full((self.rows[0].shape[0],), math.nan, dtype=torch.float64)
            return nan, torch.full((2, 2), math.nan, dtype=torch.float64), 1.0
        half = rows.shape[1] // 2
        z = torch.stack([rows[:, :half].sum(1), rows[:, half:].sum(1)], dim=1)
        return rows.mean(0), z.T @ z / len(rows), 1.0 / len(rows)

    def state(self) -> dict:
        """The window's rows, skipped ones included (``ok`` marks the averaged ones)."""
        steps = self.steps
        rows = torch.stack(list(self.rows)) if self.rows else None
        ok = torch.stack(list(self.oks)).cpu() if self.rows else None
        return {"steps": steps, "skipped": self.pushes - steps, "rows": rows, "ok": ok}

    def load(self, state: dict) -> None:
        steps, skipped = state["steps"], state.get("skipped", 0)
        self.pushes = steps + skipped
        rows, ok = state["rows"], state.get("ok")
        self.rows = deque([] if rows is None else list(rows), maxlen=self.size)
        if ok is None:  # a state from before skipped rows were saved: every row was averaged
            ok = torch.ones(len(self.rows), dtype=torch.bool)
        device = rows.device if rows is not None else None
        self.oks = deque([flag.to(device) for flag in ok], maxlen=self.size)
        started = steps + skipped > 0
        self.good = torch.tensor(float(steps), dtype=torch.float64) if started else None


def fieller_interval(
    mean_t: float, mean_q: float, cov: list[list[float]], z: float
) -> tuple[float, float]:
    """Fieller's interval for ``mean_t / mean_q`` given the means' covariance, cut to ``R >= 0``.

    Solves :math:`a R^2 - 2 b R + c \\le 0` with :math:`a = \\bar q^2 - z^2 V_{qq}`,
    :math:`b = \\bar t\\bar q - z^2 V_{tq}`, :math:`c = \\bar t^2 - z^2 V_{tt}`. For ``a > 0`` the
    set is the bounded interval between the roots; otherwise it is unbounded above. A mean
    :math:`\\bar q \\le 0` (no evidence that :math:`\\|G\\|^2 > 0`) always gives ``(0, inf)`` or
    ``(root, inf)``.
    """
    (v_tt, v_tq), (_, v_qq) = cov
    a = mean_q**2 - z * z * v_qq
    b = mean_t * mean_q - z * z * v_tq
    c = mean_t**2 - z * z * v_tt
    disc = b * b - a * c
    if a > 0 and mean_q > 0:
        root = math.sqrt(max(disc, 0.0))
        return max((b - root) / a, 0.0), max((b + root) / a, 0.0)
    if disc <= 0 or a >= 0:  # whole line, or |G|^2 significantly <= 0: no finite bound
        return 0.0, math.inf
    root = math.sqrt(disc)
    low, high = sorted(((b - root) / a, (b + root) / a))
    return (high, math.inf) if low < 0 <= high else (0.0, math.inf)


def student_quantile(p: float, dof: float) -> float:
    r"""The p-quantile (p > 1/2) of Student's t with real ``dof`` > 0 degrees of freedom.

    Exact to ~1e-8 relative for every real ``dof``, so continuous in it (Kish's effective
    sample size makes ``dof`` fractional): the two-sided mass
    :math:`P(|T| \le t) = 1 - I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`, with the regularized incomplete
    beta :math:`I` by its continued fraction (Lentz), inverted by safeguarded Newton steps from
    the Cornish-Fisher start (Abramowitz & Stegun 26.7.5, which alone is 24% low at
    :math:`\nu = 1`). The normal quantile for ``dof`` above 1e7 or infinite.
    """
    z = NormalDist().inv_cdf(p)
    if not dof < 1e7:
        return z
    if not dof > 0:
        raise ValueError(f"student_quantile: dof must be > 0, got {dof}")
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, max(_cornish_fisher(z, dof), z, 1.0)
    while _t_two_sided_mass(hi, dof) < mass:
        lo, hi = hi, 2.0 * hi
    t = 0.5 * (lo + hi)
    for _ in range(100):
        error = _t_two_sided_mass(t, dof) - mass
        if error < 0:
            lo = t
        else:
            hi = t
        step = error / (2.0 * _t_density(t, dof))
        t = t - step if lo < t - step < hi else 0.5 * (lo + hi)  # Newton, else bisection
        if hi - lo <= 1e-12 * hi or abs(step) <= 1e-13 * max(t, 1.0):
            break
    return t


def _cornish_fisher(z: float, dof: float) -> float:
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def _t_density(t: float, dof: float) -> float:
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return math.exp(log_norm - (dof + 1) / 2 * math.log1p(t * t / dof))


def _t_two_sided_mass(t: float, dof: float) -> float:
    r""":math:`P(|T| \le t) = 1 - I_x(\nu/2, 1/2)`, :math:`x = \nu / (\nu + t^2)`."""
    return 1.0 - _regularized_beta(dof / (dof + t * t), dof / 2, 0.5)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """:math:`I_x(a, b)` by the continued fraction (Numerical Recipes 6.4), on the side where
    it converges fast: :math:`x < (a + 1) / (a + b + 2)`, else as :math:`1 - I_{1-x}(b, a)`."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta, by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result
