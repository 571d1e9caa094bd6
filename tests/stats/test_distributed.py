"""DDP on 2 CPU processes (gloo): the comm-hook noise scale equals the single-process two-batch
estimate on the same data, and all_reduce_moments equals one big batch's moments."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.distributed import NoiseScaleHook, all_reduce_moments
from gradnoise.stats.engine import GradStats
from gradnoise.stats.running import NoiseScale
from gradnoise.stats.twobatch import MicroBatchNorms

WORLD, LOCAL_BATCH, STEPS = 2, 8, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def fixed_scales() -> dict[str, torch.Tensor]:
    """A deterministic diagonal preconditioner, p in [1, 2)."""
    params = make_model().named_parameters()
    return {n: 1 + torch.arange(p.numel()).reshape(p.shape).double() / p.numel() for n, p in params}


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD, LOCAL_BATCH, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(STEPS, WORLD, LOCAL_BATCH, 3, generator=gen, dtype=torch.float64)


def _error(fn) -> str:
    try:
        fn()
    except GradNoiseError as error:
        return str(error)
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    solo = dist.new_group([0])  # a one-rank group, for the world-size error
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-4)  # one param per bucket
    hook = NoiseScaleHook(ddp)
    result = {"not_ready": _error(lambda: hook.record(local_batch_size=LOCAL_BATCH))}
    if rank == 0:
        single = nn.parallel.DistributedDataParallel(copy.deepcopy(model), process_group=solo)
        result["world_one"] = _error(lambda: NoiseScaleHook(single))
        half = nn.parallel.DistributedDataParallel(make_model().half(), process_group=solo)
        result["half"] = _error(lambda: NoiseScaleHook(half))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise, xs, ys = NoiseScale(window=STEPS), *make_data()
    result["records"], result["merged"] = [], []
    for step in range(STEPS):
        measured = copy.deepcopy(model)
        with GradStats(measured) as stats:
            nn.functional.mse_loss(measured(xs[step, rank]), ys[step, rank]).backward()
        result["merged"].append(all_reduce_moments(stats.moments()))
        nn.functional.mse_loss(ddp(xs[step, rank]), ys[step, rank]).backward()
        if step == 0:  # refused before any state changes: the next record still works
            result["bad_batch"] = _error(lambda: hook.record(local_batch_size=0))
        record = hook.record(local_batch_size=LOCAL_BATCH)
        result["records"].append(record)
        noise.update(record)
        optimizer.step()
        optimizer.zero_grad()
    result["reading"] = noise.estimate()
    pre = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=1e-4)
    pre_hook = NoiseScaleHook(pre, preconditioner=fixed_scales)
    nn.functional.mse_loss(pre(xs[0, rank]), ys[0, rank]).backward()
    result["preconditioned"] = pre_hook.record(local_batch_size=LOCAL_BATCH)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """Same data, one process: rank r's batch is micro-batch r of a 2-step accumulation."""
    model, (xs, ys) = make_model(), make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise, records, moments = NoiseScale(window=STEPS), [], []
    for step in range(STEPS):
        with GradStats(copy.deepcopy(model)) as stats:
            measured = stats.model
            big_x, big_y = xs[step].reshape(-1, 6), ys[step].reshape(-1, 3)
            nn.functional.mse_loss(measured(big_x), big_y).backward()
        moments.append(stats.moments())
        with MicroBatchNorms(model) as micro:
            for rank in range(WORLD):
                loss = nn.functional.mse_loss(model(xs[step, rank]), ys[step, rank])
                (loss / WORLD).backward()
            records.append(micro.record(micro_batch_size=LOCAL_BATCH))
        noise.update(records[-1])
        optimizer.step()
        optimizer.zero_grad()
    return records, moments, noise.estimate()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_hook_equals_single_process_two_batch_estimate(ddp_results, reference):
    records, _, reading = reference
    for result in ddp_results:
        for ddp_record, ref in zip(result["records"], records, strict=True):
            assert (ddp_record.b_small, ddp_record.b_big) == (ref.b_small, ref.b_big)
            assert set(ddp_record.small_sq_norms) == set(ref.small_sq_norms)
            for name, value in ref.small_sq_norms.items():
                assert float(ddp_record.small_sq_norms[name]) == pytest.approx(float(value), 1e-9)
                assert float(ddp_record.big_sq_norms[name]) == pytest.approx(
                    float(ref.big_sq_norms[name]), rel=1e-9
                )
        ddp_reading = result["reading"]
        assert ddp_reading.b_simple == pytest.approx(reading.b_simple, rel=1e-6, nan_ok=True)
        assert ddp_reading.trace_sigma == pytest.approx(reading.trace_sigma, rel=1e-6)
        assert ddp_reading.grad_sq_norm == pytest.approx(reading.grad_sq_norm, rel=1e-6)


def test_preconditioned_hook_equals_preconditioned_accumulation(ddp_results):
    model, (xs, ys) = make_model(), make_data()
    with MicroBatchNorms(model, preconditioner=fixed_scales) as micro:
        for rank in range(WORLD):
            (nn.functional.mse_loss(model(xs[0, rank]), ys[0, rank]) / WORLD).backward()
        ref = micro.record(micro_batch_size=LOCAL_BATCH)
    plain = ddp_results[0]["records"][0]
    for result in ddp_results:
        got = result["preconditioned"]
        for name, value in ref.small_sq_norms.items():
            assert float(got.small_sq_norms[name]) == pytest.approx(float(value), rel=1e-9)
            assert float(got.big_sq_norms[name]) == pytest.approx(
                float(ref.big_sq_norms[name]), rel=1e-9
            )
            assert float(got.big_sq_norms[name]) != pytest.approx(float(plain.big_sq_norms[name]))


def test_rank_merge_equals_one_big_batch(ddp_results, reference):
    _, moments, _ = reference
    for result in ddp_results:
        for merged, big in zip(result["merged"], moments, strict=True):
            for name, record in big.items():
                assert merged[name].n == record.n == WORLD * LOCAL_BATCH
                torch.testing.assert_close(merged[name].grad_sum, record.grad_sum)
                torch.testing.assert_close(merged[name].sq_norm_sum, record.sq_norm_sum)


def test_hook_errors(ddp_results):
    assert (
        "NoiseScaleHook.record: expected a synchronized backward pass"
        in ddp_results[0]["not_ready"]
    )
    assert "expected a process group of at least 2 ranks" in ddp_results[0]["world_one"]
    assert "single process use GradStats or MicroBatchNorms" in ddp_results[0]["world_one"]
    assert "got parameters of dtype torch.float16" in ddp_results[0]["half"]
    assert "record(local_batch_size=...): expected a positive int" in ddp_results[1]["bad_batch"]


def test_hook_argument_errors_without_a_process_group():
    with pytest.raises(GradNoiseError, match=r"loss_reduction=...\): expected 'mean' or 'sum'"):
        NoiseScaleHook(nn.Linear(2, 2), loss_reduction="avg")
    with pytest.raises(
        GradNoiseError, match=r"expected a torch\.nn\.parallel\.DistributedDataParallel"
    ):
        NoiseScaleHook(nn.Linear(2, 2))
