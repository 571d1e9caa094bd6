import math

import pytest

from gradnoise.monitor.console import fmt, noisiest
from gradnoise.monitor.recommend import batch_advice, layer_advice, overhead_text

READING = {"b_simple": 100.0, "ci_low": 60.0, "ci_high": 180.0}


@pytest.mark.parametrize(
    ("batch", "phrase"),
    [
        (8, "is below the band of the measured noise scale, B_simple ~ 100 (90% band 60 to 180)"),
        (128, "is within the band of the measured noise scale"),
        (512, "is above the band of the measured noise scale"),
    ],
)
def test_batch_advice_places_the_batch_against_the_band(batch, phrase):
    assert phrase in batch_advice(batch, READING)


def test_undefined_noise_scale_says_it_is_far_above_the_batch():
    text = batch_advice(8, {"b_simple": None, "ci_low": None, "ci_high": None})
    assert "could not be told apart from its noise" in text


def test_growth_is_mentioned_only_when_the_scale_at_least_doubled():
    assert "grew from 40 to 100" in batch_advice(128, READING, {"b_simple": 40.0})
    assert "grew" not in batch_advice(128, READING, {"b_simple": 60.0})


def _steps(per_layer: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Step records holding the given (trace, grad_sq) pairs per layer, one pair per step."""
    count = len(next(iter(per_layer.values())))
    return [
        {
            "layer_trace": {name: pairs[i][0] for name, pairs in per_layer.items()},
            "layer_grad_sq": {name: pairs[i][1] for name, pairs in per_layer.items()},
        }
        for i in range(count)
    ]


def test_layer_advice_ranks_by_the_ratio_of_late_means_with_bands():
    steps = _steps(
        {
            "a": [(1.0, 0.5)] * 2,  # GSNR 0.5, no spread: band collapses onto the value
            "b": [(1.0, -0.02), (1.0, 0.04)],  # 0.01, band through 0
            "c": [(1.0, 3.0)] * 2,
        }
    )
    text = layer_advice(steps, count=2)
    assert "Lowest signal-to-noise (GSNR = |G|^2 / tr(Sigma)" in text
    assert "): b (0.01, 0 to " in text and "a (0.5, 0.5 to 0.5)" in text
    assert "Highest: c (3, 3 to 3), a (0.5" in text
    assert "1 of 3 parameters have a band that reaches 0" in text
    assert "No per-layer GSNR" in layer_advice([{}])


def test_overhead_text_quotes_the_measured_figures():
    run = {
        "overhead_fraction": 0.0234,
        "measured_steps": 25,
        "every": 40,
        "measured_step_ratio": 1.5,
        "plain_step_median": 0.04,
        "monitor_seconds": 0.8,
        "train_seconds": 60.0,
    }
    assert overhead_text(run).startswith(
        "Profiling cost 2.3% of the training time: 25 measured "
        "steps (one in 40) took 1.50x the median plain step (40.0 ms)"
    )
    assert "not measured" in overhead_text({"overhead_fraction": None})


def test_numbers_are_written_out_in_plain_figures():
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a" and fmt(float("inf")) == "unbounded"
    assert fmt(1234.5) == "1,230" and fmt(2e7) == "20,000,000" and fmt(837.4) == "837"
    assert fmt(0.000123) == "0.000123" and fmt(0.0311, 2) == "0.031" and fmt(5.0) == "5"
    assert fmt(1.79e308) == "more than 10^15" and fmt(10**400) == "unbounded"


def test_console_ranking_is_the_reports():
    steps = _steps({"a": [(1.0, 2.0)] * 2, "b": [(1.0, 0.1)] * 2, "c": [(0.0, 0.0)] * 2})
    assert noisiest(steps, 1) == [("b", pytest.approx(0.1))]
    assert [name for name, _ in noisiest(steps)] == ["b", "a"]  # c undefined: left out


def test_trade_off_follows_mccandlish_eq_2_11():
    from gradnoise.monitor.recommend import trade_offs

    (row,) = trade_offs(32, 64.0, 40.0, 100.0, [128])
    # S/S_min = 1 + Bn/B and E/E_min = 1 + B/Bn, relative to B0 = 32 at Bn = 64, 40 and 100
    assert row.steps_over_min[0] == pytest.approx(1 + 64 / 128)
    assert row.examples_over_min[0] == pytest.approx(1 + 128 / 64)
    assert row.steps[0] == pytest.approx((1 + 64 / 128) / (1 + 64 / 32))
    assert row.examples[0] == pytest.approx((1 + 128 / 64) / (1 + 32 / 64))
    ends = [(1 + n / 128) / (1 + n / 32) for n in (40.0, 100.0)]
    assert row.steps[1:] == pytest.approx((min(ends), max(ends)))
    steps, examples = row.steps_over_min, row.examples_over_min
    assert (steps[0] - 1) * (examples[0] - 1) == pytest.approx(1.0)  # on the hyperbola
    # the band's low end gives the fewest steps and the most examples, and vice versa
    assert (steps[1] - 1) * (examples[2] - 1) == pytest.approx(1.0)
    assert (steps[2] - 1) * (examples[1] - 1) == pytest.approx(1.0)


def test_unbounded_band_takes_the_large_noise_limit_and_says_so():
    from gradnoise.monitor.recommend import trade_offs

    (row,) = trade_offs(32, 46.0, 30.0, math.inf, [64])
    # B_noise -> inf: steps scale as 1/B (0.5x for 32 -> 64) at equal examples
    assert row.steps[1] == pytest.approx(0.5) and row.examples[1] == pytest.approx(1.0)
    assert math.isinf(row.steps_over_min[2])
    text = batch_advice(32, {"b_simple": 46.0, "ci_low": 30.0, "ci_high": None})
    assert "90% band 30 to unbounded" in text and "The band is unbounded above" in text
    assert "a good balance" not in text and "e+" not in text


@pytest.mark.parametrize(
    ("optimizer", "phrase"),
    [("SGD", "linear rule for SGD"), ("AdamW", "square root"), (None, "linearly with the batch")],
)
def test_learning_rate_rule_names_the_optimizer_family(optimizer, phrase):
    assert phrase in batch_advice(64, READING, optimizer=optimizer)


def test_report_and_console_show_the_same_trade_off_table(tmp_path):
    import torch

    from gradnoise.monitor import Monitor
    from gradnoise.monitor.recommend import trade_off_table
    from gradnoise.monitor.records import read_metrics
    from gradnoise.testing import LinearGaussian

    problem = LinearGaussian(dim=4)
    model = problem.model()
    generator = torch.Generator().manual_seed(0)
    with Monitor(model, out=tmp_path, every=2, tensorboard=False) as monitor:
        for _ in range(30):
            x, y = problem.sample(8, generator=generator)
            with monitor.step() as handle:
                handle.loss = problem.loss(model, x, y)
                handle.loss.backward()
            model.zero_grad()
    last = read_metrics(tmp_path).steps[-1]
    cells = trade_off_table(8, last)
    assert cells and cells[[c[0] for c in cells].index("8 (now)")][1] == "1x"
    html = (tmp_path / "report.html").read_text()
    assert "<table class='tradeoff'>" in html
    for row in cells:
        assert "".join(f"<td>{c}</td>" for c in row) in html


def test_report_states_the_tail_index_and_the_affine_fit_of_the_run():
    import torch

    from gradnoise.monitor.recommend import instrument_text

    generator = torch.Generator().manual_seed(0)
    pareto = (1 - torch.rand(30, 64, generator=generator, dtype=torch.float64)) ** (-1 / 1.5)
    grad_sq = torch.linspace(0.5, 5.0, 30, dtype=torch.float64)
    trace = 4.0 + 5.0 * grad_sq + 0.1 * torch.randn(30, generator=generator, dtype=torch.float64)
    steps = [
        {"example_norms": pareto[i].tolist(), "trace_sigma": float(t), "grad_sq_norm": float(q)}
        for i, (t, q) in enumerate(zip(trace, grad_sq, strict=True))
    ]
    text = instrument_text(steps)
    # seeded: Pareto alpha 1.5 (heavy), affine with sigma0^2 = 4, sigma1^2 = 5 and noise 0.1
    assert "(Hill, largest 64 of 640): 1.4 (90% 1.1 to 1.7), heavy" in text
    assert "over 30 measured steps: sigma0^2 = 3.97, sigma1^2 = 5 (R^2 1), consistent" in text
    assert instrument_text([{}]) == (
        "Too few per-example norms for a tail index. "
        "Too few measured steps to test the affine noise model."
    )


def test_per_layer_instruments_find_the_heavy_layer_and_the_curved_one():
    """Two layers with known truths: "heavy" has Pareto(1.5) norms and affine noise
    (sigma0^2 = 2, sigma1^2 = 3), "light" has Pareto(6) norms and tr(Sigma) = 1 + |G|^4, which
    the lack-of-fit test must reject. 60 steps of 128 examples: the late third holds 2560 norms
    per layer, a Hill tail of k = 256, relative sd 1/sqrt(k) = 1/16, so alpha is checked within
    4 sd; the slope within 4 of its standard error (the 90% half-width / 1.67)."""
    import torch

    from gradnoise.monitor.recommend import instrument_text
    from gradnoise.monitor.summary import affine_fits, tail_indices

    generator = torch.Generator().manual_seed(1)

    def pareto(alpha):
        u = torch.rand(60, 128, generator=generator, dtype=torch.float64)
        return (1 - u) ** (-1 / alpha)

    heavy, light = pareto(1.5), pareto(6.0)
    q = torch.linspace(0.5, 5.0, 60, dtype=torch.float64)
    noise = 0.05 * torch.randn(2, 60, generator=generator, dtype=torch.float64)
    steps = [
        {
            "layer_example_norms": {"heavy": heavy[i].tolist(), "light": light[i].tolist()},
            "layer_trace": {
                "heavy": float(2 + 3 * q[i] + noise[0, i]),
                "light": float(1 + q[i] ** 2 + noise[1, i]),
            },
            "layer_grad_sq": {"heavy": float(q[i]), "light": float(q[i])},
        }
        for i in range(60)
    ]
    tails = tail_indices(steps)
    assert list(tails) == ["heavy", "light"]  # heaviest first; no whole-model norms recorded
    for name, alpha in (("heavy", 1.5), ("light", 6.0)):
        assert tails[name].k == 256
        assert abs(tails[name].alpha - alpha) < 4 * alpha / 16, (name, tails[name])
    assert tails["heavy"].heavy and not tails["light"].heavy
    fits = affine_fits(steps)
    heavy_fit = fits["heavy"]
    se = (heavy_fit.sigma1_sq_high - heavy_fit.sigma1_sq) / 1.67
    assert heavy_fit.holds and abs(heavy_fit.sigma1_sq - 3) < 4 * se
    assert not fits["light"].holds and "curved" in fits["light"].reason
    text = instrument_text(steps)
    assert "Per layer, the heaviest tail is heavy" in text
    assert "1 of 2 have a significantly heavy tail: heavy." in text
    assert "Per layer, it fails for 1 of 2 (about 0.2 would by chance at 90%): light." in text
