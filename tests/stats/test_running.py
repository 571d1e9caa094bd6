"""NoiseScale on the closed-form linear-Gaussian problem: accuracy, coverage, resume, errors."""

import io
import itertools
import math

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.averaging import fieller_interval, student_quantile
from gradnoise.stats.engine import GradStats
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import trace_covariance
from gradnoise.stats.running import NoiseScale


def feed(noise: NoiseScale, records) -> NoiseScale:
    for record in records:
        noise.update(record)
    return noise


def test_window_estimate_lands_within_5_percent(linear_gaussian, lg_steps):
    # Budget: relative sd of the ratio ~ (B_simple / B) sqrt(2 / k) = 17/128 * sqrt(2/400) ~ 0.95%
    # for k = 400 steps of B = 128, so 5% is more than 5 sd.
    reading = feed(NoiseScale(window=400), lg_steps(linear_gaussian, 400, 128, seed=0)).estimate()
    assert reading.defined and reading.steps == 400
    assert abs(reading.b_simple / linear_gaussian.true_b_simple - 1) < 0.05
    assert reading.ci_low < linear_gaussian.true_b_simple < reading.ci_high


def test_interval_coverage_over_seeded_repetitions(linear_gaussian, lg_steps):
    # 200 seeded runs of 100 steps (B = 16 < B_simple = 17, the noisy regime), default EMA.
    # Budget: the binomial sd of a coverage near 0.95 over 200 runs is 1.5%, so the 0.95 interval
    # must cover in >= 90% (3 sd below nominal); the 0.9 interval must be calibrated, within
    # 3 sd (+-6.4%) of 0.9, so an interval that is simply too wide also fails.
    truth = linear_gaussian.true_b_simple
    hits = {0.9: 0, 0.95: 0}
    for rep in range(200):
        noise = feed(NoiseScale(), lg_steps(linear_gaussian, 100, 16, seed=1000 + rep))
        for level in hits:
            reading = noise.estimate(confidence=level)
            hits[level] += reading.ci_low <= truth <= reading.ci_high
    assert hits[0.95] / 200 >= 0.90
    assert abs(hits[0.9] / 200 - 0.9) <= 0.064


def test_ratio_of_averages_not_average_of_ratios():
    # two steps with (tr, |G|^2) = (4, 2) and (4, 0.5): ratio of means 8/2.5, mean of ratios 5
    steps = [_record(trace=4.0, grad_sq=2.0), _record(trace=4.0, grad_sq=0.5)]
    reading = feed(NoiseScale(window=2), steps).estimate()
    assert reading.trace_sigma == pytest.approx(4.0)
    assert reading.grad_sq_norm == pytest.approx(1.25)
    assert reading.b_simple == pytest.approx(3.2)


def _record(trace: float, grad_sq: float, n: int = 4) -> GradMoments:
    """A 1-d record with the given unbiased estimates: mean m, sum of squares chosen to fit."""
    mean_sq = grad_sq + trace / n
    sq_norm_sum = trace * (n - 1) + n * mean_sq
    grad_sum = torch.tensor([n * math.sqrt(mean_sq)], dtype=torch.float64)
    return GradMoments(n, grad_sum, torch.tensor(sq_norm_sum, dtype=torch.float64))


def test_ema_is_the_bias_corrected_weighted_average():
    gen = torch.Generator().manual_seed(3)
    values = [(1 + torch.rand(1, generator=gen).item(), 1 + torch.rand(1, generator=gen).item())]
    values += [(1 + 3 * a, 0.5 + b) for a, b in torch.rand(9, 2, generator=gen).tolist()]
    reading = feed(NoiseScale(beta=0.8), [_record(t, q) for t, q in values]).estimate()
    weights = [0.8 ** (len(values) - 1 - s) for s in range(len(values))]
    trace = sum(w * t for w, (t, _) in zip(weights, values, strict=True)) / sum(weights)
    grad_sq = sum(w * q for w, (_, q) in zip(weights, values, strict=True)) / sum(weights)
    assert reading.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert reading.grad_sq_norm == pytest.approx(grad_sq, rel=1e-10)


def test_negative_grad_sq_is_reported_undefined_not_clipped():
    # g_1 = (1, 0), g_2 = (-1, 0): mean 0, tr Sigma = 2, |G|^2 estimate = 0 - 2/2 = -1 < 0
    grads = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]] * 3, dtype=torch.float64)
    reading = feed(NoiseScale(), [GradMoments.from_per_example(g) for g in grads]).estimate()
    assert reading.grad_sq_norm == pytest.approx(-1.0)
    assert math.isnan(reading.b_simple) and not reading.defined
    assert reading.ci_high == math.inf


def test_no_data_and_one_step_readings():
    empty = NoiseScale().estimate()
    assert empty.steps == 0 and not empty.defined and math.isnan(empty.b_simple)
    one = feed(NoiseScale(), [_record(4.0, 1.0)]).estimate()
    assert one.b_simple == pytest.approx(4.0) and math.isnan(one.ci_low)


def test_fieller_interval_is_the_set_it_claims():
    cases = [(17.0, 1.0, [[4.0, 0.1], [0.1, 0.01]]), (17.0, 0.1, [[4.0, 0.1], [0.1, 0.05]])]
    z = 1.645
    for t, q, cov in cases:
        low, high = fieller_interval(t, q, cov, z)
        grid = torch.linspace(0, 200, 20001, dtype=torch.float64).tolist()
        inside = [
            r
            for r in grid
            if (t - r * q) ** 2 <= z * z * (cov[0][0] - 2 * r * cov[0][1] + r * r * cov[1][1])
        ]
        assert low == pytest.approx(inside[0], abs=0.02)
        assert (high == math.inf) == (inside[-1] == 200.0)
        if high != math.inf:
            assert high == pytest.approx(inside[-1], abs=0.02)


def test_student_quantile_matches_tables():
    # two-sided 95% / 99% table values to 9-10 digits, including dof 1-2 where a series fails
    table = [
        (0.975, 1, 12.706204736),
        (0.975, 2, 4.302652730),
        (0.975, 5, 2.570581836),
        (0.975, 10, 2.228138852),
        (0.95, 5, 2.015048373),
        (0.995, 2, 9.924843201),
        (0.995, 30, 2.749995654),
    ]
    for p, dof, exact in table:
        assert student_quantile(p, dof) == pytest.approx(exact, rel=1e-8)
    assert student_quantile(0.975, math.inf) == pytest.approx(1.95996, rel=1e-5)
    assert student_quantile(0.975, 5e7) == pytest.approx(1.95996, rel=1e-5)


def test_student_quantile_is_continuous_and_decreasing_in_fractional_dof():
    """Kish's effective dof is fractional: the quantile must not jump at the integers (a
    version exact at integers only and a series between them did)."""
    values = [student_quantile(0.95, 1 + 0.05 * k) for k in range(200)]
    assert all(a > b for a, b in itertools.pairwise(values))
    for n in range(2, 41):
        below, above = student_quantile(0.95, n - 1e-6), student_quantile(0.95, n + 1e-6)
        assert 0 < below - above < 1e-5
    # Student t at dof 1 is Cauchy: the quantile is tan(pi (p - 1/2))
    assert student_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-9)


def test_student_quantile_refuses_a_non_positive_dof():
    with pytest.raises(ValueError, match="dof must be > 0, got 0"):
        student_quantile(0.95, 0)


@pytest.mark.parametrize("config", [{"beta": 0.9}, {"window": 50}])
def test_resume_from_state_dict_continues_the_same_estimate(config, linear_gaussian, lg_steps):
    records = lg_steps(linear_gaussian, 120, 8, seed=7)
    whole = feed(NoiseScale(**config), records).estimate()
    first = feed(NoiseScale(**config), records[:70])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = NoiseScale(**config)
    resumed.load_state_dict(torch.load(buffer))
    assert feed(resumed, records[70:]).estimate() == whole


def test_per_layer_and_gradstats_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    from_stats, from_moments = NoiseScale(window=5), NoiseScale(window=5)
    per_layer = {}
    for _ in range(5):
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        with GradStats(model) as stats:
            nn.functional.mse_loss(model(x), y).backward()
        from_stats.update(stats)
        from_moments.update(stats.moments())
        for name, record in stats.moments().items():
            trace = trace_covariance(record)
            grad_sq = record.mean.pow(2).sum() - trace / record.n
            old = per_layer.get(name, (0.0, 0.0))
            per_layer[name] = (old[0] + float(trace), old[1] + float(grad_sq))
    reading, want = from_stats.estimate(), from_moments.estimate()
    # GradStats reads two scalars per parameter, the moments path whole records: same numbers
    # up to float64 rounding
    for field in ("b_simple", "ci_low", "ci_high", "trace_sigma", "grad_sq_norm"):
        assert getattr(reading, field) == pytest.approx(getattr(want, field), rel=1e-12)
    assert reading.per_layer == pytest.approx(want.per_layer, rel=1e-12, nan_ok=True)
    assert (reading.steps, reading.defined) == (want.steps, want.defined)
    assert set(reading.per_layer) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, (trace, grad_sq) in per_layer.items():
        expected = trace / grad_sq if grad_sq > 0 else math.nan
        assert reading.per_layer[name] == pytest.approx(expected, rel=1e-9, nan_ok=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.0}, r"NoiseScale\(beta=...\): expected a float in \[0, 1\)"),
        ({"window": 1}, r"NoiseScale\(window=...\): expected None or an int >= 2"),
        ({"confidence": 1.5}, r"NoiseScale\(confidence=...\): expected a number in \(0, 1\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GradNoiseError, match=match):
        NoiseScale(**kwargs)


def test_update_and_read_errors_leave_state_unchanged():
    noise = feed(NoiseScale(window=3), [{"w": _record(4.0, 1.0)}, {"w": _record(5.0, 1.0)}])
    before = noise.estimate()
    with pytest.raises(GradNoiseError, match="expected GradStats, a non-empty dict"):
        noise.update([1.0])
    with pytest.raises(GradNoiseError, match="got an empty dict"):
        noise.update({})
    with pytest.raises(GradNoiseError, match=r"differing in \['v', 'w'\]"):
        noise.update({"v": _record(4.0, 1.0)})
    with pytest.raises(GradNoiseError, match=r"NoiseScale\(confidence=...\)"):
        noise.estimate(confidence=0.0)
    assert noise.estimate() == before


def test_load_state_dict_errors():
    saved = feed(NoiseScale(beta=0.9), [_record(4.0, 1.0)] * 3).state_dict()
    target = feed(NoiseScale(beta=0.5), [_record(1.0, 1.0)] * 2)
    before = target.estimate()
    with pytest.raises(GradNoiseError, match="expected a state saved by NoiseScale with"):
        target.load_state_dict(saved)
    with pytest.raises(GradNoiseError, match="got a dict without 'average'"):
        target.load_state_dict({"beta": 0.5, "window": None})
    assert target.estimate() == before


def test_parameter_order_may_change_between_steps():
    a, b = {"u": _record(4.0, 1.0), "w": _record(2.0, 1.0)}, {"w": _record(2.0, 1.0)}
    b["u"] = _record(4.0, 1.0)  # same parameters, other order (as after DDP rebuilds buckets)
    reading = feed(NoiseScale(window=2), [a, b]).estimate()
    assert reading.per_layer == pytest.approx({"u": 4.0, "w": 2.0})
