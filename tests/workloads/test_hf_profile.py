"""`gradnoise profile --model CONFIG --data PATH`: a transformers causal LM from a local config.

Tiny GPT-2 and Llama configs and a short text are written into tmp_path; every test runs with
the network cut (any socket connect fails), so nothing can be downloaded.
"""

import json
import math
import re
import socket

import pytest
import torch

from gradnoise.cli import main
from gradnoise.errors import GradNoiseError
from gradnoise.monitor.records import read_metrics
from gradnoise.workloads.corpus import TEXT

transformers = pytest.importorskip("transformers")

from gradnoise.workloads.hf import (  # noqa: E402
    HELDOUT_WINDOWS,
    hf_lm_loss,
    is_config_spec,
    make_hf_workload,
)

TINY = ["--steps", "4", "--every", "2", "--batch-size", "4", "--seq-len", "32", "--no-console"]
GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_positions": 64,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Cut the network: a test that tried to download would fail loudly."""

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2.json").write_text(json.dumps(GPT2))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "text.txt").write_text(TEXT)
    lines = [json.dumps({"text": part, "id": i}) for i, part in enumerate(TEXT.split("\n\n"))]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _error(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _check_run(out, name):
    metrics = read_metrics(out)
    assert metrics.run["workload"] == name and metrics.run["steps"] == 4
    assert [r["step"] for r in metrics.steps] == [1, 3]
    last = metrics.steps[-1]
    for key in ("b_simple", "trace_sigma", "grad_sq_norm", "heldout_loss", "loss"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    assert last["b_simple"] > 0
    assert (out / "report.html").is_file() and (out / "plots").is_dir()
    return metrics


def test_profile_a_gpt2_config_file_on_a_text(files, capsys):
    args = ["profile", "--model", "gpt2.json", "--data", "text.txt", "--out", "run", *TINY]
    assert main(args) == 0
    metrics = _check_run(files / "run", "transformers:gpt2")
    assert "GPT2LMHeadModel" in metrics.run["description"]
    assert "byte-level tokens" in metrics.run["description"]
    assert all(mode != "fallback" for mode in metrics.run["coverage"].values())
    assert "profiling transformers:gpt2" in " ".join(capsys.readouterr().out.split())


def test_profile_a_llama_model_directory_on_a_jsonl(files):
    args = ["profile", "--model", "llama", "--data", "docs.jsonl", "--out", "run", *TINY]
    assert main(args) == 0
    assert "LlamaForCausalLM" in _check_run(files / "run", "transformers:llama").run["description"]


def test_the_workload_windows_split_and_loss(files):
    config = dict(GPT2, **NO_DROPOUT, vocab_size=50)  # below 256: bytes fold mod vocab_size
    (files / "small.json").write_text(json.dumps(config))
    workload = make_hf_workload("small.json", "text.txt", batch_size=6, seq_len=16, seed=3)
    (batch,) = next(workload.batches)
    assert batch.shape == (6, 16) and batch.dtype == torch.long and int(batch.max()) < 50
    (heldout,) = workload.heldout
    tokens = len(TEXT.encode())
    assert heldout.shape == (min((tokens - int(tokens * 0.9)) // 16, HELDOUT_WINDOWS), 16)
    assert "bytes mod 50" in workload.description
    # the model's own loss is the mean of per-window means (what GradStats expects)
    workload.model.eval()
    with torch.no_grad():
        whole = hf_lm_loss(workload.model, (batch,))
        rows = torch.stack([hf_lm_loss(workload.model, (row[None],)) for row in batch])
    torch.testing.assert_close(whole, rows.mean())
    # the seed fixes the weights and the batches
    again = make_hf_workload("small.json", "text.txt", batch_size=6, seq_len=16, seed=3)
    assert torch.equal(next(again.batches)[0], batch)
    for a, b in zip(workload.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_seq_len_defaults_to_the_context_when_shorter(files):
    (files / "ctx.json").write_text(json.dumps(dict(GPT2, n_positions=48)))
    workload = make_hf_workload("ctx.json", "text.txt", batch_size=2)
    assert next(workload.batches)[0].shape == (2, 48)


def test_a_tokenizer_in_the_model_directory_is_used(files):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]", "[EOS]"])
    tokenizer.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(files / "llama")
    workload = make_hf_workload("llama", "docs.jsonl", batch_size=2, seq_len=8)
    assert "tokens of the tokenizer in the model directory" in workload.description
    (batch,) = next(workload.batches)
    assert int(batch.max()) < 200
    train = int(re.search(r"([\d,]+) training tokens", workload.description)[1].replace(",", ""))
    assert len(TEXT.split()) < train / 0.9 < len(TEXT) / 3  # words and punctuation, not bytes
    # the config file itself, given directly, means byte-level tokens
    direct = make_hf_workload("llama/config.json", "docs.jsonl", batch_size=2, seq_len=8)
    assert "byte-level tokens" in direct.description


def test_specs_that_name_a_config():
    assert is_config_spec("models/tiny") and is_config_spec("config.json")
    assert is_config_spec("org/model")  # a hub name: refused by resolve_config, never fetched
    assert not is_config_spec("my_module") and not is_config_spec("pkg.mod:make")
    assert not is_config_spec("path/to/file.py:make")


BAD_CONFIGS = [
    ("models/nope", None, "got a path that does not exist. Check the path; gradnoise downloads"),
    ("openai-community/gpt2", None, "got a path that does not exist"),
    ("gpt2", None, "a hub name such as gpt2 or org/model must first be downloaded"),
    ("empty", None, "got a directory without config.json"),
    ("text.txt", None, "got the file text.txt"),
    ("nomodel.json", {"vocab_size": 10}, "got no model_type"),
    ("unknown.json", {"model_type": "no_such_arch"}, "got model_type 'no_such_arch'"),
    ("bert.json", {"model_type": "bert"}, "got an encoder (masked-LM) config"),
    ("t5.json", {"model_type": "t5"}, "got an encoder-decoder config (model_type 't5')"),
    ("vit.json", {"model_type": "vit"}, "got model_type 'vit', which has no causal-LM class"),
]


@pytest.mark.parametrize(
    ("spec", "config", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_configs_get_a_clear_error(files, capsys, spec, config, message):
    (files / "empty").mkdir()
    if config is not None:
        (files / spec).write_text(json.dumps(config))
    args = ["profile", "--model", spec, "--data", "text.txt", "--out", "run", *TINY]
    assert main(args) == 2
    err = _error(capsys)
    assert err.startswith(f"error: --model {spec}: expected ") and message in err, err
    assert not (files / "run").exists()


BAD_DATA = [
    ("missing.txt", None, "--data missing.txt: expected a local text file", "does not exist"),
    ("empty.txt", "", "--data empty.txt: expected some text to train on", "got an empty file"),
    (
        "blank.jsonl",
        '{"text": ""}\n\n',
        "--data blank.jsonl: expected some text",
        'only empty "text"',
    ),
    ("short.txt", "x" * 300, "expected at least 320 tokens", "smaller --seq-len (at most 30)"),
    (
        "bad.jsonl",
        '{"text": "a"}\n{"prompt": "b"}\n',
        "--data bad.jsonl line 2: expected",
        'no "text"',
    ),
    ("num.jsonl", '{"text": 3}\n', 'a string "text" field', 'got "text": 3'),
    ("broken.jsonl", '{"text": "a"\n', "--data broken.jsonl line 1: expected one JSON", "invalid"),
]


@pytest.mark.parametrize(
    ("name", "text", "message", "more"), BAD_DATA, ids=[d[0] for d in BAD_DATA]
)
def test_bad_data_gets_a_clear_error(files, capsys, name, text, message, more):
    if text is not None:
        (files / name).write_text(text)
    args = ["profile", "--model", "gpt2.json", "--data", name, "--out", "run", *TINY]
    assert main(args) == 2
    err = _error(capsys)
    assert message in err and more in err, err
    assert not (files / "run").exists()


def test_flag_mismatches_get_a_clear_error(files, capsys):
    assert main(["profile", "--model", "gpt2.json", "--out", "run", *TINY]) == 2
    assert "--model gpt2.json: expected --data PATH with it" in _error(capsys)
    args = ["profile", "--data", "text.txt", "--out", "run", *TINY]
    assert main(args) == 2
    assert "--data: expected --model CONFIG beside it" in _error(capsys)
    args = ["profile", "--model", "gpt2.json", "--data", "text.txt", "--out", "run", *TINY]
    assert main([*args, "--seq-len", "65"]) == 2
    assert "--seq-len: expected at most the model's context, 64 positions, got 65" in _error(capsys)
    assert not (files / "run").exists()


def test_the_library_call_refuses_a_batch_of_one(files):
    with pytest.raises(GradNoiseError, match="batch_size: expected an int >= 2"):
        make_hf_workload("gpt2.json", "text.txt", batch_size=1)


def test_weights_are_float32_whatever_the_config_says(files):
    (files / "bf16.json").write_text(json.dumps(dict(LLAMA, torch_dtype="bfloat16")))
    workload = make_hf_workload("bf16.json", "text.txt", batch_size=2, seq_len=16)
    assert {p.dtype for p in workload.model.parameters()} == {torch.float32}
    assert workload.model.training
