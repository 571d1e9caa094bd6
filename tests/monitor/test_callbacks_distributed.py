"""The HF Trainer callback on 2 CPU processes (gloo, set up by the Trainer as under torchrun): one
noise-scale series, written by rank 0 only, equal to one process training on the same batches."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradnoise.monitor.records import read_metrics

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORLD, ROWS, GLOBAL_BATCH, EVERY = 2, 64, 8, 2
COMPARED = ("batch_size", "trace_sigma", "grad_sq_norm", "b_batch", "b_simple", "ci_low", "ci_high")


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(ROWS, 6, generator=generator)
        self.y = (self.x[:, 0] > 1).long() * 2  # mostly one class: a clear signal, B_simple ~ 1

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _train(out: str, per_device_batch: int) -> None:
    import transformers

    from gradnoise.monitor.hf import GradNoiseTrainerCallback

    class InOrder(transformers.Trainer):
        # in order: with 2 ranks, Accelerate hands batch 2k to rank 0 and 2k+1 to rank 1, so
        # global step k holds rows [8k, 8k+8) as the single process's step k does
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "hf"),
        per_device_train_batch_size=per_device_batch,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = GradNoiseTrainerCallback(out=os.path.join(out, "noise"), every=EVERY)
    InOrder(model=_Model(), args=args, train_dataset=_Rows(), callbacks=[callback]).train()


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    _train(os.path.join(root, f"rank{rank}"), GLOBAL_BATCH // WORLD)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainer_on_two_processes_gives_the_single_process_series(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    _train(str(tmp_path / "single"), GLOBAL_BATCH)
    two = read_metrics(tmp_path / "rank0" / "noise")
    one = read_metrics(tmp_path / "single" / "noise")
    assert not (tmp_path / "rank1" / "noise").exists()  # only rank 0 writes
    assert [r["step"] for r in two.steps] == [r["step"] for r in one.steps] == [1, 3, 5, 7]
    assert any(r["b_simple"] is not None for r in one.steps)  # the series is not all undefined
    for got, want in zip(two.steps, one.steps, strict=True):
        for key in COMPARED:
            if want[key] is None:
                assert got[key] is None, key
            else:
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got[key], want[key])
        assert got["example_norms"] == pytest.approx(want["example_norms"], rel=1e-5)
    assert two.run["steps"] == one.run["steps"] == ROWS // GLOBAL_BATCH
