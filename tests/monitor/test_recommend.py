import pytest

from gradnoise.monitor.console import fmt, noisiest
from gradnoise.monitor.recommend import batch_advice, layer_advice, overhead_text

READING = {"b_simple": 100.0, "ci_low": 60.0, "ci_high": 180.0}


@pytest.mark.parametrize(
    ("batch", "phrase"),
    [
        (8, "is below the measured noise scale, B_simple ~ 100 (90% band 60 to 180)"),
        (128, "is within the band of the measured noise scale"),
        (512, "is above the measured noise scale"),
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


def test_layer_advice_names_lowest_and_highest():
    text = layer_advice({"a": 0.5, "b": 0.01, "c": 3.0, "d": 1.0}, count=2)
    assert "Lowest signal-to-noise (mean GSNR): b (0.01), a (0.5)." in text
    assert "Highest: c (3), d (1)." in text
    assert "No per-layer GSNR" in layer_advice({})


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


def test_console_helpers():
    assert fmt(None) == "n/a" and fmt(1234.5) == "1.23e+03" and fmt(2e7) == "2.00e+07"
    assert noisiest({"gsnr": {"a": 2.0, "b": None, "c": 0.5}}, 1) == [("c", 0.5)]
