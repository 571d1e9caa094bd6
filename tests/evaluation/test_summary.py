"""summarize: which parts apply to which file, and the notes and errors when they do not."""

import json

import pytest
from rich.text import Text

from gradnoise.errors import GradNoiseError
from gradnoise.evaluation import bootstrap_interval, read_results, summarize
from gradnoise.evaluation.display import renderables
from gradnoise.evaluation.plots import plot_evaluation


def _file(path, records):
    records = [{k: v for k, v in r.items() if v != ""} for r in records]  # "" = no system
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_results(path)


def _seeded(system, items=6, seeds=3, offset=0.0):
    return [
        {"system": system, "item": i, "seed": s, "score": (i % 3) / 3 + 0.05 * s + offset}
        for i in range(items)
        for s in range(seeds)
    ]


def _sampled(system, items=5, samples=4):
    return [
        {"system": system, "item": i, "sample": j, "correct": (i + j) % 3 == 0}
        for i in range(items)
        for j in range(samples)
    ]


def test_items_seeds_and_comparison_of_a_two_system_file(tmp_path):
    results = _file(tmp_path / "r.jsonl", _seeded("a") + _seeded("b", offset=0.1))
    ev = summarize(results, resamples=500, seed=3)
    a, b = ev.systems
    assert (a.name, b.name, a.records) == ("a", "b", 18)
    item_means = [(i % 3) / 3 + 0.05 for i in range(6)]  # mean over seeds 0, 1, 2
    expected = bootstrap_interval(item_means, resamples=500, seed=3)
    assert (a.items.estimate, a.items.low, a.items.high) == pytest.approx(
        (expected.estimate, expected.low, expected.high), abs=1e-12
    )
    assert a.per_seed == pytest.approx({"0": 1 / 3, "1": 1 / 3 + 0.05, "2": 1 / 3 + 0.1})
    assert a.seeds.n == 3 and a.components.n_seeds == 3 and a.components.n_items == 6
    c = ev.comparison
    assert (c.a, c.b, c.only_a, c.only_b) == ("a", "b", 0, 0)
    assert c.result.difference == pytest.approx(-0.1) and c.result.losses == 6
    assert ev.skipped == {str(tmp_path / "r.jsonl"): 0}


def test_pass_at_k_for_the_ks_each_item_has_samples_for(tmp_path):
    results = _file(tmp_path / "s.jsonl", _sampled(""))
    ev = summarize(results, ks=(1, 2, 10))
    (system,) = ev.systems
    assert system.name == "s"  # no system field: the file's stem
    assert [p.k for p in system.pass_at_k] == [1, 2]
    assert "pass@k for k = 10 needs that many samples per item (4)" in system.notes
    assert system.pass_at_k[0].estimate == pytest.approx(system.items.estimate)  # pass@1


def test_notes_when_a_part_does_not_apply(tmp_path):
    records = [{"item": 0, "sample": 0, "score": 0.5}, {"item": 0, "seed": 1, "score": 1.0}]
    (one,) = summarize(_file(tmp_path / "one.jsonl", records)).systems
    assert one.items is None and one.seeds is None and one.pass_at_k == []
    assert one.notes == [
        "only one item: no interval over items",
        "some records have no seed: no per-seed analysis",
        "scores are not all 0/1: no pass@k",
    ]
    gaps = [*_seeded("", items=4), {"item": 9, "seed": 0, "score": 1.0}]
    (system,) = summarize(_file(tmp_path / "gaps.jsonl", gaps)).systems
    assert "1 item(s) lack a seed: left out of the per-seed analysis" in system.notes
    assert system.components.n_items == 4
    (single,) = summarize(_file(tmp_path / "p1.jsonl", _sampled("", items=1))).systems
    assert "pass@k needs at least 2 items for its error" in single.notes


def test_three_systems_and_disjoint_items(tmp_path):
    records = _seeded("a") + _seeded("b") + _seeded("c")
    ev = summarize(_file(tmp_path / "three.jsonl", records))
    assert ev.comparison is None
    assert ev.notes == ["3 systems: pass --systems A,B to compare two of them"]
    ev = summarize(_file(tmp_path / "three.jsonl", records), systems=("c", "a"))
    assert (ev.comparison.a, ev.comparison.b) == ("c", "a")
    disjoint = [{"system": "x", "item": 1, "score": 1}, {"system": "x", "item": 2, "score": 0}]
    disjoint += [{"system": "y", "item": 3, "score": 1}, {"system": "y", "item": 2, "score": 1}]
    c = summarize(_file(tmp_path / "d.jsonl", disjoint)).comparison
    assert c.result is None and (c.only_a, c.only_b) == (1, 1)
    assert c.note == "1 shared item(s): a paired comparison needs at least 2"


def test_two_files_compared(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _file(tmp_path / "a" / "run.jsonl", _seeded(""))
    b = _file(tmp_path / "b" / "run.jsonl", _seeded("", offset=0.2))
    ev = summarize(a, other=b)
    assert ev.comparison.a == str(tmp_path / "a" / "run.jsonl")  # same stems: full paths
    assert ev.comparison.result.difference == pytest.approx(-0.2)
    named = _file(tmp_path / "n.jsonl", _seeded("new"))
    assert summarize(a, other=named).comparison.a == "run"


def test_renderables_and_plot_for_every_part(tmp_path):
    records = _seeded("a") + _seeded("b", offset=0.1) + _sampled("a", samples=3)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "oops\n")
    ev = summarize(read_results(tmp_path / "r.jsonl"), ks=(1, 2), resamples=200)
    texts = [str(part) for part in renderables(ev) if isinstance(part, Text)]
    assert texts[0].startswith("a - b = ")
    assert any("sign test: " in text for text in texts)
    assert texts[-1].startswith("skipped 1 unusable line(s) of ") and "line " in texts[-1]
    path = plot_evaluation(ev, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lonely = summarize(_file(tmp_path / "one.jsonl", [{"item": 1, "score": 1}]))
    assert plot_evaluation(lonely, tmp_path / "one.png").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"systems": ("a", "zz")},
            r"--systems: expected two different systems of the file, from a, b, got a, zz "
            r"\(not found: zz\)\. Name two of the file's systems",
        ),
        ({"systems": ("a", "a")}, r"--systems: expected two different systems .* got a, a\."),
        ({"systems": ("a",)}, r"--systems: expected two different systems .* got a\."),
        (
            {"ks": (0, 5)},
            r"summarize ks \(--k\): expected one or more positive integers, got \(0, 5\)\. "
            r"Use for example --k 1,5,10",
        ),
        ({"ks": ()}, r"summarize ks \(--k\): expected one or more positive integers, got \(\)"),
        ({"confidence": 1.2}, r"summarize confidence: expected a number in \(0, 1\), got 1\.2"),
        ({"resamples": 1}, r"summarize resamples: expected an integer >= 100, got 1"),
    ],
)
def test_errors(tmp_path, kwargs, match):
    results = _file(tmp_path / "r.jsonl", _seeded("a") + _seeded("b"))
    with pytest.raises(GradNoiseError, match=match):
        summarize(results, **kwargs)


def test_compare_errors(tmp_path):
    two = _file(tmp_path / "two.jsonl", _seeded("a") + _seeded("b"))
    one = _file(tmp_path / "one.jsonl", _seeded("c"))
    with pytest.raises(
        GradNoiseError,
        match=r"--compare with '.*two\.jsonl': expected one system per file, got systems "
        r"'a', 'b'\. Compare two systems of one file with --systems A,B",
    ):
        summarize(two, other=one)
    with pytest.raises(
        GradNoiseError,
        match=r"summarize: expected other= or systems=, not both, got both\. Compare two files",
    ):
        summarize(one, other=one, systems=("a", "b"))
