"""gradnoise calibrate: the crossing and the hyperbola fit against closed forms, and a tiny
end-to-end run that writes calibration.json and shows it in the report."""

import json
import math

import pytest

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.calibrate import (
    CalibrationSettings,
    Curve,
    calibrate,
    crossing_step,
    fit_critical_batch,
    read_calibration,
)


def test_crossing_is_interpolated_between_evaluations():
    curve = Curve(batch=8, lr=1e-3, seed=0, steps=[0, 10, 20], heldout=[3.0, 2.0, 1.0])
    assert crossing_step(curve, 2.5) == pytest.approx(5.0)
    assert crossing_step(curve, 1.0) == pytest.approx(20.0)
    assert crossing_step(curve, 0.5) is None


@pytest.mark.parametrize("b_crit", [20.0, 300.0])
def test_fit_recovers_the_critical_batch_of_mccandlish_curves(b_crit):
    batches = [8, 16, 32, 64, 128, 256]
    s_min = 150.0
    steps = [s_min * (1 + b_crit / b) for b in batches]
    fit = fit_critical_batch(batches, steps)
    assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
    # 5% multiplicative noise: still within 30% (a seeded perturbation, fixed signs)
    noisy = [s * (1 + 0.05 * (-1) ** i) for i, s in enumerate(steps)]
    assert fit_critical_batch(batches, noisy)["b_crit"] == pytest.approx(b_crit, rel=0.3)


def test_fit_refuses_points_that_do_not_follow_the_hyperbola():
    assert math.isnan(fit_critical_batch([8, 16, 32], [100.0, 200.0, 400.0])["b_crit"])
    assert math.isnan(fit_critical_batch([8, 16], [100.0, 60.0])["b_crit"])


def test_bad_settings_are_refused_before_any_training():
    with pytest.raises(GradNoiseError, match="--batches: expected at least 3 batch sizes"):
        calibrate(CalibrationSettings(batches=(8, 16)))
    with pytest.raises(GradNoiseError, match="--reference-batch: expected one of --batches"):
        calibrate(CalibrationSettings(batches=(8, 16, 64), reference_batch=32))


def test_tiny_calibration_writes_its_file_and_the_report_shows_it(tmp_path):
    from gradnoise.monitor.profile import run_profile
    from gradnoise.workloads import get_workload

    run_profile(get_workload("images", batch_size=8), steps=8, every=4, out=tmp_path, console=False)
    settings = CalibrationSettings(
        workload="images",
        batches=(4, 8, 16),
        lr_factors=(1.0,),
        reference_batch=8,
        budget_examples=320,
        eval_examples=80,
        warmup=2,
        measure_every=2,
    )
    lines = []
    result = calibrate(settings, out=tmp_path, progress=lines.append)
    assert len(lines) == 3 and lines[0].startswith("seed 0: reference run B=8")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["settings"]["batches"] == [4, 8, 16] and len(saved["summary"]) >= 1
    assert read_calibration(tmp_path)["summary"][0]["target"] == pytest.approx(
        result["summary"][0]["target"]
    )
    from gradnoise.monitor.report import write_report

    html = write_report(tmp_path).read_text()
    assert "<h2>Calibrated critical batch</h2>" in html and 'id="plot-calibration"' in html
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(GradNoiseError, match="expected a calibration written by gradnoise"):
        read_calibration(tmp_path)
