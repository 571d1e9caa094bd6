"""A user's ``transformers`` causal LM, built from its config, on a local text: all offline.

``make_hf_workload(config, data, batch_size=B)`` reads a transformers config (a ``config.json``
file, or a model directory holding one), builds the model with random weights in float32
(``AutoModelForCausalLM.from_config``: no weights are read, nothing is downloaded, no remote code
runs) and cuts a local text file into windows of ``seq_len`` tokens:

* **Tokens.** When ``config`` is a directory that also holds tokenizer files
  (``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``, ...), that tokenizer is
  loaded from them (``AutoTokenizer``, local files only). Otherwise (a ``config.json`` file
  given directly, or a directory without tokenizer files) every UTF-8 byte is one token, id
  ``byte % vocab_size``.
* **Data.** A ``.jsonl`` file holds one JSON object per line whose ``"text"`` field is a
  document; any other file is one plain UTF-8 text. Documents are joined with the tokenizer's
  end-of-sequence token (byte-level: a blank line).
* **Split.** The first 90% of the tokens train: every batch is ``batch_size`` windows at random
  offsets. The last 10% is held out: up to 64 non-overlapping windows, whose loss the profile
  reports at every measured step. A small file is soon memorized (the held-out loss then rises
  while the training loss falls), and so is a noise scale measured on it.
* **Loss.** The model's own, ``model(input_ids=ids, labels=ids).loss``: the mean next-token
  cross-entropy over the batch's ``batch_size * (seq_len - 1)`` predictions. The windows have
  equal lengths and no padding, so it is the mean of the per-window means that
  ``GradStats(loss_reduction="mean")`` expects.

Only decoder (causal) language models are supported: an encoder-only config (BERT, RoBERTa, ...
without ``"is_decoder": true``) and an encoder-decoder config (T5, BART, ...) are refused with a
message that says so. ``transformers`` is an optional dependency (``pip install
gradnoise[transformers]``), imported only when a workload is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.workloads.base import Workload

__all__ = [
    "HELDOUT_FRACTION",
    "HELDOUT_WINDOWS",
    "TOKENIZER_FILES",
    "hf_lm_loss",
    "is_config_spec",
    "make_hf_workload",
    "resolve_config",
]

HELDOUT_FRACTION = 0.1
HELDOUT_WINDOWS = 64  # at most this many held-out windows (one forward at each measured step)
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 1e-3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def _error(what: str, expected: str, got: str, fix: str) -> GradNoiseError:
    return GradNoiseError(explain(what, expected=expected, got=got, fix=fix))


def hf_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(input_ids=ids, labels=ids).loss``: the model's own shifted token-mean loss."""
    (input_ids,) = batch
    return model(input_ids=input_ids, labels=input_ids).loss


def is_config_spec(spec: str) -> bool:
    """Whether ``--model spec`` names a config rather than ``MODULE:FACTORY``.

    An existing path, a name ending in ``.json`` and a path without ``:`` (``models/tiny``,
    ``org/model``) are configs, and :func:`resolve_config` refuses any that is not a local
    config; a bare name without ``:`` (``my_module``) stays a factory spec, whose error asks
    for the ``:``.
    """
    if Path(spec).expanduser().exists() or spec.endswith(".json"):
        return True
    return ":" not in spec and ("/" in spec or os.sep in spec)


def resolve_config(spec: str | Path) -> tuple[Path, Path | None]:
    """``(config.json, tokenizer directory or None)`` of a local config file or model directory.

    Anything that is not an existing local path is refused: a hub name such as ``gpt2`` or
    ``meta-llama/Llama-3.2-1B`` is never looked up.
    """
    path = Path(spec).expanduser()
    what = f"--model {spec}"
    expected = "a local transformers config: a config.json file or a model directory holding one"
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise _error(
                what,
                expected,
                "a directory without config.json",
                "point --model at the directory that holds config.json, or at the file itself",
            )
        tokenizer = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
        return config, tokenizer
    if path.is_file():
        if path.suffix != ".json":
            hint = f" (for a factory write {spec}:FUNCTION)" if path.suffix == ".py" else ""
            raise _error(
                what,
                expected,
                f"the file {path.name}{hint}",
                "pass a config.json file or the model directory",
            )
        return path, None
    raise _error(
        what,
        f"MODULE:FACTORY, or {expected}",
        "a path that does not exist",
        "check the path; gradnoise downloads nothing, so a hub name such as gpt2 or "
        "org/model must first be downloaded (for example with `hf download org/model "
        "config.json --local-dir DIR`) and the directory passed",
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning chatter about a config (not errors) while building."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _import_transformers():
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise _error(
            "--model CONFIG",
            "the transformers package, to build a model from its config",
            "an environment without it",
            "pip install 'gradnoise[transformers]'",
        ) from exc
    return transformers


def _load_config(transformers, path: Path):
    what = f"--model {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _error(
            what, "a JSON config", f"a file that is not valid JSON ({exc})", "fix it"
        ) from exc
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise _error(
            what,
            'a transformers config with a "model_type" field (gpt2, llama, ...)',
            "no model_type" if isinstance(raw, dict) else f"a JSON {type(raw).__name__}",
            'add "model_type": "<architecture>" as written by transformers\' save_pretrained',
        )
    try:
        with _quiet_transformers():
            return transformers.AutoConfig.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
    except (ValueError, KeyError, OSError) as exc:
        raise _error(
            what,
            f"a model_type this transformers {transformers.__version__} knows",
            f"model_type {raw['model_type']!r} ({str(exc).splitlines()[0]})",
            "upgrade transformers, or use a built-in architecture (remote code is never run)",
        ) from exc


def _check_causal(transformers, config, path: Path) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    what = f"--model {path}"
    kind = config.model_type
    expected = "the config of a causal (decoder) language model such as gpt2, llama or qwen2"
    if getattr(config, "is_encoder_decoder", False):
        raise _error(
            what,
            expected,
            f"an encoder-decoder config (model_type {kind!r})",
            "sequence-to-sequence models are not supported yet; profile a decoder-only model",
        )
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        encoder = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        raise _error(
            what,
            expected,
            f"model_type {kind!r}, "
            + (
                "an encoder (masked-LM) architecture"
                if encoder
                else f"which has no causal-LM class in transformers {transformers.__version__}"
            ),
            "masked-LM and other heads are not supported yet; profile a causal LM config",
        )
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise _error(
            what,
            expected,
            f"an encoder (masked-LM) config (model_type {kind!r} without is_decoder)",
            'masked-LM training is not supported yet; set "is_decoder": true in config.json '
            f"to profile {kind} as a causal decoder instead",
        )


def _context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_seq_len(seq_len, context: int | None) -> int:
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise _error(
            "--seq-len",
            "an int >= 2 (a window needs one token to predict from and one to predict)",
            repr(seq_len),
            f"pass for example --seq-len {DEFAULT_SEQ_LEN}",
        )
    if context is not None and seq_len > context:
        raise _error(
            "--seq-len",
            f"at most the model's context, {context} positions",
            repr(seq_len),
            f"pass --seq-len {context} or less",
        )
    return seq_len


def _documents(path: Path) -> list[str]:
    what = f"--data {path}"
    if not path.is_file():
        got = "a directory" if path.is_dir() else "a path that does not exist"
        raise _error(
            what,
            'a local text file, or a .jsonl file with a "text" field per line',
            got,
            "check the path",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _error(
            what, "UTF-8 text", f"bytes that are not UTF-8 ({exc})", "re-encode it"
        ) from exc
    documents = [text] if path.suffix != ".jsonl" else _jsonl_documents(text, what)
    if not any(documents):
        got = "an empty file" if not text.strip() else 'only empty "text" fields'
        raise _error(what, "some text to train on", got, "point --data at a non-empty text")
    return documents


def _jsonl_documents(text: str, what: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(
                f"{what} line {number}",
                "one JSON object per line",
                f"invalid JSON ({exc})",
                "fix the line, or give the file another suffix than .jsonl to read it as text",
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            if not isinstance(record, dict):
                got = f"a JSON {type(record).__name__}"
            elif "text" in record:
                got = f'"text": {record["text"]!r}'
            else:
                got = f'an object with keys {sorted(record)[:6]} and no "text"'
            raise _error(
                f"{what} line {number}",
                'a JSON object with a string "text" field (the document)',
                got,
                'write each document as {"text": "..."}',
            )
        documents.append(record["text"])
    return documents


def _load_tokenizer(transformers, directory: Path):
    try:
        with _quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
    except Exception as exc:  # any failure to load means the same to the user
        raise _error(
            f"--model {directory}",
            "tokenizer files that load offline with AutoTokenizer",
            f"an error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            f"fix or remove them, or pass --model {directory / 'config.json'} to use "
            "byte-level tokens instead",
        ) from exc


def _tokenize(documents: list[str], tokenizer, vocab_size: int) -> tuple[torch.Tensor, str]:
    if tokenizer is None:
        data = "\n\n".join(documents).encode("utf-8")
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() % vocab_size
        note = "byte-level tokens" + (
            f" (bytes mod {vocab_size}: distinct bytes share ids)" if vocab_size < 256 else ""
        )
        return ids, note
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for index, document in enumerate(documents):
        if index and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
    tensor = torch.tensor(ids, dtype=torch.long)
    if len(tensor) and int(tensor.max()) >= vocab_size:
        raise _error(
            "the tokenizer",
            f"token ids below the config's vocab_size ({vocab_size})",
            f"id {int(tensor.max())}",
            "use the tokenizer that belongs to this config, or raise vocab_size",
        )
    return tensor, "tokens of the tokenizer in the model directory"


def _split(ids: torch.Tensor, seq_len: int, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if len(ids) == 0:
        raise _error(f"--data {data}", "some tokens", "none", "point --data at a longer text")
    split = int(len(ids) * (1 - HELDOUT_FRACTION))
    train, tail = ids[:split], ids[split:]
    if len(tail) < seq_len:
        need = 10 * seq_len
        raise _error(
            f"--data {data}",
            f"at least {need:,} tokens, so that the held-out last 10% holds one window of "
            f"--seq-len {seq_len} tokens",
            f"{len(ids):,} tokens",
            f"use a longer text or a smaller --seq-len (at most {max(len(ids) // 10, 1)})",
        )
    count = min(len(tail) // seq_len, HELDOUT_WINDOWS)
    heldout = tail[: count * seq_len].view(count, seq_len)
    return train, heldout


def _windows(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor]]:
    """Endless batches of ``batch_size`` windows of ``data`` at random offsets."""
    while True:
        starts = torch.randint(0, len(data) - seq_len + 1, (batch_size, 1), generator=generator)
        yield (data[starts + torch.arange(seq_len)],)


def make_hf_workload(
    config: str | Path,
    data: str | Path,
    *,
    batch_size: int = 32,
    seq_len: int | None = None,
    seed: int = 0,
) -> Workload:
    """The causal LM of ``config`` (random weights) trained on windows of the text ``data``.

    ``config`` is a local ``config.json`` or a model directory holding one (with tokenizer files,
    its tokenizer is used; otherwise byte-level tokens); ``data`` a UTF-8 text or a ``.jsonl``
    file with a ``"text"`` field per line. ``seq_len`` defaults to the smaller of 128 and the
    model's context. ``seed`` seeds the weights (in a forked RNG) and the window offsets.
    Bad input raises :class:`~gradnoise.errors.GradNoiseError` before any model is built.
    """
    if not isinstance(batch_size, int) or batch_size < 2:
        raise _error(
            "batch_size",
            "an int >= 2 (a gradient variance needs two examples)",
            repr(batch_size),
            "pass --batch-size 2 or more",
        )
    config_path, tokenizer_dir = resolve_config(config)
    data = Path(data).expanduser()
    documents = _documents(data)
    transformers = _import_transformers()
    hf_config = _load_config(transformers, config_path)
    _check_causal(transformers, hf_config, config_path)
    seq_len = _check_seq_len(seq_len, _context(hf_config))
    tokenizer = _load_tokenizer(transformers, tokenizer_dir) if tokenizer_dir else None
    ids, tokens = _tokenize(documents, tokenizer, hf_config.vocab_size)
    train, heldout = _split(ids, seq_len, data)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    model = model.float().train()  # float32 whatever dtype the config names
    if getattr(model, "loss_type", None) is None:  # GPT2LMHeadModel & co: the default, said once
        model.loss_type = "ForCausalLM"  # (transformers would warn and fall back to it)
    params = sum(p.numel() for p in model.parameters())
    source = tokenizer_dir or config_path
    return Workload(
        name=f"transformers:{hf_config.model_type}",
        model=model,
        batches=_windows(train, batch_size, seq_len, torch.Generator().manual_seed(seed)),
        loss=hf_lm_loss,
        lr=DEFAULT_LR,
        description=f"{type(model).__name__} from {source} with random weights "
        f"({params:,} parameters) on {data.name}: {len(train):,} training tokens "
        f"({tokens}) in windows of {seq_len}, {len(heldout)} held-out windows",
        heldout=(heldout,),
    )
