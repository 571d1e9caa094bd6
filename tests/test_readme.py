"""The README's GradStats example runs as written and prints what it promises."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(marker: str = "<!-- readme-example") -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


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


def test_readme_rule_example_is_picked_up_by_the_registry_and_matches_the_reference():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from gradnoise import GradStats
    from gradnoise.layers import registry
    from gradnoise.testing.check import reference_errors

    saved = dict(registry._RULES)
    namespace = {"F": F, "nn": nn, "torch": torch}
    namespace.update({n: getattr(registry, n) for n in ("BaseRule", "register")})
    namespace["pieces_from_per_example"] = registry.pieces_from_per_example
    try:
        exec(compile(_example("<!-- readme-rule-example"), str(README), "exec"), namespace)
        rule = namespace["PReLURule"]
        assert any(isinstance(r, rule) for r in registry.registered_rules())
        _, model, (x,) = registry.rule_for(F.prelu).contract_cases()[0]
        loss = lambda m, x: torch.sin(m(x)).sum(2).mean(1).mean()  # noqa: E731
        errors = reference_errors(model, loss, (x,), elementwise=True)
        assert max(e for per in errors.values() for e in per.values()) < 1e-9
        with GradStats(model) as stats:
            loss(model, x).backward()
        assert stats.coverage() == {"weight": "direct"}
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)
