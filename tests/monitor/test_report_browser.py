"""report.html in headless Chromium: the page renders, every plot loads, the console stays quiet.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; CI installs it). A probe script is
appended to a copy of the report; after the load event it writes how many images there are and
how many failed to decode into an attribute that ``--dump-dom`` prints. Console messages reach
stderr through ``--enable-logging=stderr``. A deliberately broken page checks the checker.
"""

import re
import shutil
import subprocess

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.monitor import Monitor

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed: apt-get install -y chromium (CI installs it)"
)
PROBE = (
    '<script>window.addEventListener("load", () => { const imgs = [...document.images];'
    " const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
    ' document.body.setAttribute("data-probe", `images=${imgs.length} broken=${broken}`);'
    " });</script>"
)


def _chromium(tmp_path, url, *extra):
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def inspect(tmp_path, page):
    """(number of images, number broken, console lines) of ``page`` in headless Chromium."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    result = _chromium(tmp_path, probed.as_uri(), "--dump-dom")
    found = re.search(r'data-probe="images=(\d+) broken=(\d+)"', result.stdout)
    assert found, f"probe did not run; stderr: {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return int(found[1]), int(found[2]), console


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with Monitor(model, out=out, every=2) as monitor:
        for _ in range(6):
            with monitor.step() as step:
                step.loss = F.cross_entropy(model(x), y)
                step.loss.backward()
    return out / "report.html"


def test_report_plots_load_without_console_errors(tmp_path, report):
    images, broken, console = inspect(tmp_path, report)
    assert (images, broken, console) == (5, 0, [])


@pytest.fixture(scope="module")
def calibrated_report(tmp_path_factory):
    """A profile of a problem with a defined noise scale, then a tiny calibration beside it."""
    from gradnoise.monitor.calibrate import CalibrationSettings, calibrate
    from gradnoise.monitor.report import write_report
    from gradnoise.testing import LinearGaussian

    out = tmp_path_factory.mktemp("calibrated")
    problem = LinearGaussian(dim=4)
    model = problem.model()
    generator = torch.Generator().manual_seed(0)
    with Monitor(model, out=out, every=2, tensorboard=False) as monitor:
        for _ in range(30):
            x, y = problem.sample(8, generator=generator)
            with monitor.step() as step:
                step.loss = problem.loss(model, x, y)
                step.loss.backward()
            model.zero_grad()
    settings = CalibrationSettings(
        workload="images", batches=(4, 8, 16), lr_factors=(1.0,), budget_examples=2560
    )
    calibrate(settings, out=out)
    return write_report(out)


def test_report_shows_the_trade_off_table_and_the_calibration(tmp_path, calibrated_report):
    images, broken, console = inspect(tmp_path, calibrated_report)
    assert (images, broken, console) == (6, 0, [])  # the five plots and the calibration figure
    dom = _chromium(tmp_path, calibrated_report.as_uri(), "--dump-dom").stdout
    assert 'class="tradeoff"' in dom and "steps vs now" in dom
    assert "Calibrated critical batch" in dom and 'id="plot-calibration"' in dom
    shot = tmp_path / "calibrated.png"
    _chromium(
        tmp_path, calibrated_report.as_uri(), f"--screenshot={shot}", "--window-size=1000,3000"
    )
    assert matplotlib.image.imread(shot)[..., :3].std() > 0.05


def test_report_screenshot_shows_a_rendered_page(tmp_path, report):
    shot = tmp_path / "report.png"
    _chromium(tmp_path, report.as_uri(), f"--screenshot={shot}", "--window-size=1000,2400")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1000)
    assert pixels[..., :3].std() > 0.05  # text and plots, not a blank page


@pytest.fixture(scope="module")
def instrumented_report(tmp_path_factory):
    """Enough measured steps for both instruments: 30 steps of 32 examples, every step
    measured, so the late third holds 320 per-example norms per layer (a Hill tail of 32)."""
    out = tmp_path_factory.mktemp("instruments")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    with Monitor(model, out=out, every=1, tensorboard=False) as monitor:
        for _ in range(30):
            x = torch.randn(32, 6)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
            with monitor.step() as step:
                step.loss = F.cross_entropy(model(x), y)
                step.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return out / "report.html"


def _decoded_plot(html, name):
    import base64
    import io

    found = re.search(rf'id="plot-{name}" alt="{name}" src="data:image/png;base64,([^"]+)"', html)
    assert found, f"no {name} plot in the report"
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(found[1])), format="png")


def test_report_shows_the_tail_index_and_affine_fit_per_layer(tmp_path, instrumented_report):
    images, broken, console = inspect(tmp_path, instrumented_report)
    assert (images, broken, console) == (5, 0, [])
    dom = _chromium(tmp_path, instrumented_report.as_uri(), "--dump-dom").stdout
    assert "Tail index of the late per-example gradient norms" in dom
    assert "Per layer, the heaviest tail is" in dom
    assert "Affine noise model tr(Sigma)" in dom and "Per layer, " in dom
    html = instrumented_report.read_text()
    for name in ("norms", "affine"):
        pixels = _decoded_plot(html, name)[..., :3]
        right = pixels[:, pixels.shape[1] // 2 :]
        assert right.std() > 0.05, f"{name}: the per-layer panel is blank"
        # the per-layer panels draw intervals in blue or red: some pixels are saturated colour
        colour = (right.max(-1) - right.min(-1)) > 0.4
        assert colour.sum() > 50, f"{name}: no intervals drawn in the per-layer panel"
    shot = tmp_path / "instruments.png"
    _chromium(
        tmp_path, instrumented_report.as_uri(), f"--screenshot={shot}", "--window-size=1000,4000"
    )
    assert matplotlib.image.imread(shot)[..., :3].std() > 0.05


def test_the_checker_sees_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
        '<img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    images, broken, console = inspect(tmp_path, page)
    assert (images, broken) == (2, 2) and any('"boom"' in line for line in console)
