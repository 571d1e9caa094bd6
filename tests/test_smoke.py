import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "B_simple" in result.stdout


def test_import_is_light_and_the_monitor_is_lazy():
    code = (
        "import sys, gradnoise; "
        "assert 'matplotlib' not in sys.modules and 'rich' not in sys.modules; "
        "assert gradnoise.Monitor.__name__ == 'Monitor'; "
        "assert 'matplotlib' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    import gradnoise

    with pytest.raises(AttributeError, match="no attribute 'Moniter'"):
        gradnoise.Moniter
