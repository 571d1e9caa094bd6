"""The README's promises beyond "every block runs" (tests/test_docs.py runs every block).

The ten-line example stays ten lines and prints a finite noise scale; the rule example is picked
up by the registry and agrees with the reference loop; the README starts with the two commands.
"""

import math
import re

from tests.test_docs import ROOT, Block, blocks, run_block

README = ROOT / "README.md"


def _example(marker: str = "<!-- readme-example") -> Block:
    (block,) = [b for b in blocks(README) if b.lang == "python" and marker in b.before]
    return block


def test_readme_example_is_at_most_ten_lines_of_code():
    lines = [line for line in _example().code.splitlines() if line.strip()]
    assert len(lines) <= 10


def test_readme_example_runs_and_prints_a_finite_noise_scale(capsys):
    namespace = run_block(_example())
    norms, stats = namespace["norms"], namespace["stats"]
    assert norms["0.weight"].shape == (32,)
    assert set(stats.coverage().values()) == {"product"}
    out = capsys.readouterr().out
    assert "product" in out
    printed = float(out.split()[0])
    assert math.isfinite(printed) and printed == stats.noise_scale().b_simple
    assert f"`{printed:.1f}" in README.read_text()  # the value the text after the block quotes


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_rule_example_is_picked_up_by_the_registry_and_matches_the_reference():
    import torch
    import torch.nn.functional as F

    from gradnoise import GradStats
    from gradnoise.layers import registry
    from gradnoise.testing.check import reference_errors

    saved = dict(registry._RULES)
    try:
        namespace = run_block(_example("<!-- readme-rule-example"))
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


def test_readme_names_what_gradstats_cannot_detect():
    text = README.read_text()
    section = re.search(r"### What GradStats cannot detect\n(.*?)\n### ", text, re.S).group(1)
    assert "T == B" in section and "h - h.mean(0)" in section and "contrastive" in section
