"""DDP on 2 gloo processes with uneven per-rank batches (8 and 24) and with no_sync()
accumulation: every rank's record and running estimate equal the single-process two-batch
estimate on the same data (issue 11), for mean and sum losses.

The single-process reference computes each rank's local gradient g_r directly; with harmonic
mean H of the ranks' sizes, the small batch is the mean of ||g_r||^2 at size H and the big one
||mean_r g_r||^2 at size W H (mean loss) or N = sum_r b_r (sum loss, gradients of the mean).
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.distributed import NoiseScaleHook
from gradnoise.stats.running import NoiseScale
from gradnoise.stats.twobatch import TwoBatchNorms

WORLD, SIZES, STEPS, MICRO = 2, (8, 24), 4, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data(rank: int, step: int, size: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(size, 3, generator=gen, dtype=torch.float64)


def loss_of(model, x, y, reduction):
    return nn.functional.mse_loss(model(x), y, reduction=reduction)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = {}
    for reduction in ("mean", "sum"):
        ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=1e-4)
        hook, noise, records = NoiseScaleHook(ddp, loss_reduction=reduction), NoiseScale(), []
        for step in range(STEPS):
            x, y = make_data(rank, step, SIZES[rank])
            loss_of(ddp, x, y, reduction).backward()
            records.append(hook.record(local_batch_size=SIZES[rank]))
            noise.update(records[-1])
            ddp.zero_grad()
        result[f"uneven-{reduction}"] = (records, noise.estimate())
    ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=1e-4)
    hook, noise, records = NoiseScaleHook(ddp), NoiseScale(), []
    for step in range(STEPS):
        x, y = make_data(rank, step, MICRO * 8)
        with ddp.no_sync():
            (loss_of(ddp, x[:8], y[:8], "mean") / MICRO).backward()
        (loss_of(ddp, x[8:], y[8:], "mean") / MICRO).backward()
        if step == 0:
            try:
                hook.record(local_batch_size=8)
                result["micro_error"] = "no error"
            except GradNoiseError as error:
                result["micro_error"] = str(error)
        records.append(hook.record(local_batch_size=MICRO * 8))
        noise.update(records[-1])
        ddp.zero_grad()
    result["no_sync"] = (records, noise.estimate())
    ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=1e-4)
    hook, records = NoiseScaleHook(ddp), []
    for step in range(STEPS):  # recorded every other step only: not accumulation
        x, y = make_data(rank, step, SIZES[rank])
        loss_of(ddp, x, y, "mean").backward()
        if step % 2:
            records.append(hook.record(local_batch_size=SIZES[rank]))
        ddp.zero_grad()
    result["every_other"] = records
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_grads(model, x, y, reduction):
    model.zero_grad()
    loss_of(model, x, y, reduction).backward()
    scale = 1.0 / len(x) if reduction == "sum" else 1.0  # the gradient of the mean loss
    return {n: p.grad.detach() * scale for n, p in model.named_parameters()}


def reference(sizes, reduction):
    """One process: the two-batch records from each rank's local mean-loss gradient."""
    model, noise, records = make_model(), NoiseScale(), []
    harmonic = WORLD / sum(1.0 / b for b in sizes)
    total = float(sum(sizes))
    for step in range(STEPS):
        grads = [_local_grads(model, *make_data(r, step, sizes[r]), reduction) for r in range(2)]
        weights = [1 / WORLD] * WORLD if reduction == "mean" else [b / total for b in sizes]
        small, big = {}, {}
        for name in grads[0]:
            small[name] = sum(g[name].pow(2).sum() for g in grads) / WORLD
            big[name] = sum(w * g[name] for w, g in zip(weights, grads, strict=True)).pow(2).sum()
        big_batch = harmonic * WORLD if reduction == "mean" else total
        records.append(TwoBatchNorms(small, harmonic, big, big_batch))
        noise.update(records[-1])
    return records, noise.estimate()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-uneven")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(got, want):
    (records, reading), (ref_records, ref_reading) = got, want
    for record, ref in zip(records, ref_records, strict=True):
        assert (record.b_small, record.b_big) == pytest.approx((ref.b_small, ref.b_big))
        for name, value in ref.small_sq_norms.items():
            assert float(record.small_sq_norms[name]) == pytest.approx(float(value), rel=1e-9)
            assert float(record.big_sq_norms[name]) == pytest.approx(
                float(ref.big_sq_norms[name]), rel=1e-9
            )
    for field in ("b_simple", "trace_sigma", "grad_sq_norm"):
        assert getattr(reading, field) == pytest.approx(getattr(ref_reading, field), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uneven_batches_give_every_rank_the_single_process_estimate(results, reduction):
    want = reference(SIZES, reduction)
    assert want[0][0].b_small == pytest.approx(12.0)  # harmonic mean of 8 and 24
    for result in results:
        _assert_same(result[f"uneven-{reduction}"], want)


def test_no_sync_accumulation_counts_every_micro_batch(results):
    want = reference((MICRO * 8, MICRO * 8), "mean")
    for result in results:
        _assert_same(result["no_sync"], want)
        assert result["micro_error"] == (
            "NoiseScaleHook.record(local_batch_size=...): expected the examples in this rank's "
            "gradient since the last synchronized step (16 over 2 forward passes), got "
            "local_batch_size=8, one micro-batch. Pass local_batch_size=16 under gradient "
            "accumulation."
        )


def test_recording_some_steps_only_is_not_taken_for_accumulation(results):
    """Forward passes are counted per synchronized backward, not per record."""
    want, _ = reference(SIZES, "mean")
    for result in results:
        got = result["every_other"]
        assert len(got) == STEPS // 2
        for record, ref in zip(got, want[1::2], strict=True):
            assert record.b_small == pytest.approx(ref.b_small)
            for name, value in ref.small_sq_norms.items():
                assert float(record.small_sq_norms[name]) == pytest.approx(float(value), rel=1e-9)
