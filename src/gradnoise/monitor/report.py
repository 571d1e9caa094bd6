"""report.html: one self-contained page (plots embedded as base64 PNGs) from metrics.jsonl."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from gradnoise.monitor.calibrate import agreement_text, plot_calibration, read_calibration
from gradnoise.monitor.console import fmt
from gradnoise.monitor.plots import write_plots
from gradnoise.monitor.recommend import (
    TRADE_OFF_HEADER,
    batch_advice,
    instrument_text,
    layer_advice,
    overhead_text,
    trade_off_table,
)
from gradnoise.monitor.records import Metrics, finite_number, read_metrics

__all__ = ["REPORT_FILE", "render_html", "write_report"]

REPORT_FILE = "report.html"

CAPTIONS = {
    "noise_scale": "Running simple noise scale with its 90% band; dots are single batches.",
    "gsnr": "GSNR = |G|^2 / tr(Sigma) of each parameter over the second half of training, "
    "with its 90% band (0: no detectable signal).",
    "norms": "Per-example gradient norms, first third versus last third of the measured steps; "
    "right: the Hill tail index of each layer's late per-example norms with its 90% interval "
    "(at or below 2: infinite variance).",
    "affine": "The affine noise model tr(Sigma) = sigma0^2 + sigma1^2 |G|^2 (the assumption of "
    "the Adam and AdaGrad convergence results), fitted over the measured steps; right: each "
    "layer's slope with its 90% interval, red where the model fails its lack-of-fit test.",
    "loss": "Training and held-out loss (and the data's entropy floor when it is known).",
    "calibration": "gradnoise calibrate: steps against examples at each loss target with the "
    "fitted hyperbola, and the measured critical batch beside B_simple.",
}

STYLE = (
    "body{font-family:sans-serif;max-width:56em;margin:2em auto;color:#222}"
    "img{max-width:100%}td,th{padding:2px 10px;text-align:left}figure{margin:1em 0}"
)


def _image(name: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img id="plot-{name}" alt="{name}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>"
    )


def _facts(metrics: Metrics) -> str:
    last, run = metrics.steps[-1], metrics.run or {}
    rows = [
        ("workload", run.get("workload", "custom")),
        ("steps trained / measured", f"{run.get('steps', '?')} / {len(metrics.steps)}"),
        ("batch size", last.get("batch_size")),
        ("noise scale B_simple (latest)", fmt(last.get("b_simple"))),
        ("90% band", f"{fmt(last.get('ci_low'))} to {fmt(last.get('ci_high'))}"),
        ("final loss (training)", fmt(last.get("loss"), 4)),
        ("final held-out loss", fmt(last.get("heldout_loss"), 4)),
        ("excess over the entropy floor", _excess(last, run)),
        ("measured steps skipped (NaN/inf gradients)", _skipped(last, run)),
    ]
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _excess(last: dict, run: dict) -> str:
    floor, heldout = finite_number(run.get("loss_floor")), finite_number(last.get("heldout_loss"))
    if floor is None or heldout is None:
        return "n/a (the data's floor is not known)" if floor is None else "n/a"
    return f"{fmt(heldout - floor, 3)} nats (floor {fmt(floor, 4)})"


def _skipped(last: dict, run: dict) -> int:
    """Skips counted by the run summary, else by the last step record (a run cut short)."""
    counts = [run.get("skipped_steps"), last.get("skipped_steps")]
    return max((c for c in counts if c is not None), default=0)


def _trade_off_html(metrics: Metrics) -> str:
    cells = trade_off_table(metrics.batch_size, metrics.steps[-1])
    if not cells:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TRADE_OFF_HEADER)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
    )
    caption = (
        "<caption>Predicted trade-off (McCandlish et al. 2018, eq. 2.11, with B_noise = "
        "B_simple and its 90% band; formulas in docs/profile.md)</caption>"
    )
    return f"<table class='tradeoff'>{caption}<tr>{head}</tr>{rows}</table>"


def _coverage(run: dict | None) -> str:
    coverage = (run or {}).get("coverage") or {}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in coverage.items()
    )
    summary = f"<summary>Coverage ({len(coverage)} parameters)</summary>"
    return f"<details>{summary}<table>{rows}</table></details>"


def _calibration_html(calibration: dict | None, plots: dict[str, Path]) -> str:
    if calibration is None:
        return ""
    return (
        f"<h2>Calibrated critical batch</h2><p>{html.escape(agreement_text(calibration))}</p>"
        + (_image("calibration", plots["calibration"]) if "calibration" in plots else "")
    )


def render_html(metrics: Metrics, plots: dict[str, Path], calibration: dict | None = None) -> str:
    """The report page for ``metrics`` with the PNG files of ``plots`` embedded, and the result
    of ``gradnoise calibrate`` when one is given."""
    paragraphs = [
        batch_advice(
            metrics.batch_size,
            metrics.steps[-1],
            metrics.steps[0],
            optimizer=(metrics.run or {}).get("optimizer"),
        ),
        layer_advice(metrics.steps),
        instrument_text(metrics.steps),
        overhead_text(metrics.run),
    ]
    if metrics.skipped:
        paragraphs.append(f"{metrics.skipped} unreadable line(s) of metrics.jsonl were skipped.")
    body = f"<p>{html.escape(paragraphs[0])}</p>{_trade_off_html(metrics)}" + "".join(
        f"<p>{html.escape(p)}</p>" for p in paragraphs[1:]
    )
    figures = "".join(_image(n, p) for n, p in plots.items() if n != "calibration")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gradnoise report</title>"
        f"<style>{STYLE}</style></head><body><h1>gradnoise profile</h1>{_facts(metrics)}"
        f"<h2>Recommendation</h2>{body}{_calibration_html(calibration, plots)}"
        f"<h2>Plots</h2>{figures}{_coverage(metrics.run)}"
        "</body></html>"
    )


def write_report(directory: str | Path) -> Path:
    """Read ``directory/metrics.jsonl``, draw the plots and write ``directory/report.html``."""
    directory = Path(directory)
    metrics = read_metrics(directory)
    floor = finite_number((metrics.run or {}).get("loss_floor"))
    plots = write_plots(metrics.steps, directory / "plots", loss_floor=floor)
    calibration = read_calibration(directory)
    if calibration is not None:
        plots["calibration"] = plot_calibration(
            calibration, directory / "plots" / "calibration.png"
        )
    path = directory / REPORT_FILE
    path.write_text(render_html(metrics, plots, calibration), encoding="utf-8")
    return path
