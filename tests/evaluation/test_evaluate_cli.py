"""`gradnoise evaluate` on good and malformed files, with the plot it writes."""

import json

import pytest

from gradnoise.cli import build_parser, main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at the terminal's width, paths included: make lines long enough to match."""
    monkeypatch.setenv("COLUMNS", "1000")


def _records():
    """Two systems, 3 seeds, 4 samples per (item, seed): every part of the output applies."""
    out = []
    for system, shift in (("base", 0), ("new", 1)):
        for item in range(12):
            for seed in range(3):
                for sample in range(4):
                    correct = (item + seed + sample + shift * (item % 2)) % 3 == 0
                    out.append(
                        {"system": system, "item": f"q{item}", "seed": seed, "sample": sample}
                        | {"correct": correct}
                    )
    return out


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _out(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


def test_a_good_file_prints_every_part_and_writes_the_plot(tmp_path, capsys):
    path = _write(tmp_path / "results.jsonl", [json.dumps(r) for r in _records()])
    assert main(["evaluate", str(path), "--k", "1,4,20", "--resamples", "300"]) == 0
    text = _out(capsys)
    for expected in (
        "score over items",
        "score over seeds",
        "unbiased pass@k",
        "base - new = ",
        "sign test: ",
        "minimum detectable difference",
        "pass@k for k = 20 needs that many samples per item (12)",
    ):
        assert expected in text, expected
    assert "skipped" not in text
    plot = tmp_path / "results.evaluation.png"
    assert f"plot: {plot}" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_malformed_file_counts_its_skipped_lines(tmp_path, capsys):
    lines = [json.dumps(r) for r in _records()[:96]]  # system base only
    lines[3] = "{not json"
    lines[10] = json.dumps({"item": "q0", "score": "high"})
    lines.append(json.dumps({"item": "q1", "score": float("nan")}))  # NaN: not finite
    path = _write(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "plots"
    assert main(["evaluate", str(path), "--out", str(out), "--resamples", "200"]) == 0
    text = _out(capsys)
    assert (
        f"skipped 3 unusable line(s) of {path} (line 4: not JSON; line 11: 'score' is str, "
        "not a number; line 97: 'score' is not finite)" in text
    )
    assert (out / "bad.evaluation.png").is_file()


def test_compare_two_files_and_name_two_systems(tmp_path, capsys):
    records = _records()
    a = _write(tmp_path / "a.jsonl", [json.dumps(r) for r in records if r["system"] == "base"])
    b = _write(tmp_path / "b.jsonl", [json.dumps(r) for r in records if r["system"] == "new"])
    assert main(["evaluate", str(a), "--compare", str(b), "--resamples", "200"]) == 0
    assert "base - new = " in _out(capsys)
    both = _write(tmp_path / "both.jsonl", [json.dumps(r) for r in records])
    assert main(["evaluate", str(both), "--systems", "new,base", "--resamples", "200"]) == 0
    assert "new - base = " in _out(capsys)


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    empty = _write(tmp_path / "empty.jsonl", ["junk", "more junk"])
    assert main(["evaluate", str(empty)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: results file ") and "got none (2 unusable line(s)" in err
    good = _write(tmp_path / "g.jsonl", [json.dumps(r) for r in _records()])
    assert main(["evaluate", str(good), "--systems", "base,zz"]) == 2
    assert "(not found: zz)" in capsys.readouterr().err
    assert main(["evaluate", str(good), "--out", str(good)]) == 2
    assert "which is a file" in " ".join(capsys.readouterr().err.split())


def test_the_parser(tmp_path):
    args = build_parser().parse_args(["evaluate", "r.jsonl"])
    assert (args.k, args.confidence, args.resamples, args.seed, args.out) == (
        (1, 5, 10),
        0.95,
        2000,
        0,
        None,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "r.jsonl", "--compare", "o", "--systems", "a,b"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "r.jsonl", "--k", "1,x"])


def test_names_from_the_file_are_printed_as_written(tmp_path, capsys):
    """A system called "[bold]x[/bold]" is not rich markup: it prints with its brackets."""
    lines = [json.dumps({"system": "[bold]x[/bold]", "item": i, "score": i % 2}) for i in range(6)]
    lines.append('{"item": 1, "score": "[/]"}')
    path = _write(tmp_path / "odd.jsonl", lines)
    assert main(["evaluate", str(path), "--resamples", "100"]) == 0
    text = _out(capsys)
    assert "[bold]x[/bold]" in text and "line 7: 'score' is str, not a number" in text
