"""The README's GradStats example runs as written and prints what it promises."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    marker = text.index("<!-- readme-example")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_readme_example_is_at_most_ten_lines_of_code():
    lines = [line for line in _example().splitlines() if line.strip()]
    assert len(lines) <= 10


def test_readme_example_runs(capsys):
    namespace = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    norms, stats = namespace["norms"], namespace["stats"]
    assert norms["0.weight"].shape == (32,)
    assert set(stats.coverage().values()) == {"product"}
    assert "product" in capsys.readouterr().out


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
