"""One table-driven contract that every optimizer of gradnoise.optim passes (optax style).

Each row says how to build the optimizer, how one training step feeds it (a plain backward, a
closure, a closure plus SVRG snapshots, or GradStats moments) and gives a hand-written reference
step on plain tensors, computed from per-example gradients with torch.func, independent of the
package's functional updates.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from gradnoise.errors import GradNoiseError
from gradnoise.optim import MARS, STORM, SVRG, VRGD, NoiseAdaptive
from gradnoise.stats import GradStats

N, DIM = 64, 4
GEN = torch.Generator().manual_seed(0)
X = torch.randn(N, DIM, generator=GEN)
W_TRUE = torch.randn(1, DIM, generator=GEN)
Y = X @ W_TRUE.T + 0.1 * torch.randn(N, 1, generator=GEN)
SNAPSHOT_EVERY = 4


def batch_at(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, N, (size,), generator=torch.Generator().manual_seed(1000 + step))
    return X[index], Y[index]


def fresh_model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(DIM, 1)


def full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(((model(X) - Y) ** 2).mean())


def example_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = x @ params["weight"].T + params["bias"]
    return ((out - y) ** 2).mean()


def per_example(params: dict, x, y) -> dict:
    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])


def mean_grad(params: dict, x, y) -> dict:
    return grad(example_loss)(params, x, y)


def train_step(kind: str, model: nn.Module, opt, step: int) -> None:
    x, y = batch_at(step)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    if kind == "plain":
        closure()
        opt.step()
    elif kind in ("closure", "svrg"):
        if kind == "svrg" and step % SNAPSHOT_EVERY == 0:
            opt.snapshot(lambda: ((model(X) - Y) ** 2).mean().backward())
        opt.step(closure)
    else:
        opt.zero_grad()
        with GradStats(model, elementwise=True) as stats:
            ((model(x) - y) ** 2).mean().backward()
        opt.step(moments=stats)


# ----------------------------------------------------------------------- hand-written references
def ref_adam(s, key, g, lr, b1, b2, eps, t):
    s[key + "m"] = b1 * s.get(key + "m", 0 * g) + (1 - b1) * g
    s[key + "v"] = b2 * s.get(key + "v", 0 * g) + (1 - b2) * g * g
    return (s[key + "m"] / (1 - b1**t)) / ((s[key + "v"] / (1 - b2**t)).sqrt() + eps)


def ref_mars(variant):
    def step(params, s, t, x, y):
        g_now = mean_grad(params, x, y)
        out = {}
        for k, g in g_now.items():
            c = g + 0.1 * 0.9 / 0.1 * (g - s.get(k + "prev", g))
            c = c / max(1.0, float(c.norm()) / 1.0)
            s[k + "prev"] = g
            if variant == "lion":
                s[k + "m"] = 0.9 * s.get(k + "m", 0 * g) + 0.1 * c
                out[k] = params[k] * (1 - 0.01 * 0.01) - 0.01 * s[k + "m"].sign()
            else:
                d = ref_adam(s, k, c, 0.01, 0.9, 0.99, 1e-8, t)
                out[k] = params[k] * (1 - 0.01 * 0.01) - 0.01 * d
        return out

    return step


def ref_storm(params, s, t, x, y):
    g_now = mean_grad(params, x, y)
    g_prev = mean_grad(s["prev"], x, y) if "prev" in s else None
    d = {k: g if g_prev is None else g + 0.7 * (s["d"][k] - g_prev[k]) for k, g in g_now.items()}
    s["d"], s["prev"] = d, params
    return {k: params[k] - 0.05 * d[k] for k in params}


def ref_svrg(params, s, t, x, y):
    if t % SNAPSHOT_EVERY == 1:
        s["snap"], s["mu"] = params, mean_grad(params, X, Y)
    g, g_snap = mean_grad(params, x, y), mean_grad(s["snap"], x, y)
    return {k: params[k] - 0.05 * (g[k] - g_snap[k] + s["mu"][k]) for k in params}


def ref_noise_adaptive(params, s, t, x, y):
    per = per_example(params, x, y)
    out = {}
    for k, g in per.items():
        mean, var = g.mean(0), g.var(0, unbiased=True)
        trace, grad_sq = var.sum(), mean.pow(2).sum() - var.sum() / len(g)
        s[k + "t"] = 0.5 * s.get(k + "t", 0.0) + 0.5 * trace
        s[k + "q"] = 0.5 * s.get(k + "q", 0.0) + 0.5 * grad_sq
        t_avg, q_avg = s[k + "t"] / (1 - 0.5**t), s[k + "q"] / (1 - 0.5**t)
        gain = min(max(float(q_avg / (q_avg + t_avg / len(g))), 0.05), 1.0) if q_avg > 0 else 0.05
        s[k + "b"] = 0.9 * s.get(k + "b", 0 * mean) + mean
        out[k] = params[k] - 0.05 * gain * s[k + "b"]
    return out


def ref_vrgd(params, s, t, x, y):
    per = per_example(params, x, y)
    out = {}
    for k, g in per.items():
        mean, var = g.mean(0), g.var(0, unbiased=True)
        r = mean**2 / var
        scale = (r / r.mean()).clamp(0.7, 1.3)
        out[k] = params[k] - 0.01 * scale * ref_adam(s, k, mean, 0.01, 0.9, 0.999, 1e-8, t)
    return out


@dataclass
class Row:
    name: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    kind: str
    reference: Callable
    invalid: list[tuple[dict, str]]


ROWS = [
    Row(
        "mars_adamw",
        lambda m, **kw: MARS(
            m.parameters(),
            **{"lr": 0.01, "betas": (0.9, 0.99), "gamma": 0.1, "weight_decay": 0.01, **kw},
        ),
        "plain",
        ref_mars("adamw"),
        [
            ({"lr": 0.0}, "MARS(lr=...): expected a positive learning rate"),
            ({"betas": (0.9, 1.0)}, "MARS(betas=...): expected two floats in [0, 1)"),
            ({"eps": 0.0}, "MARS(eps=...): expected a positive float"),
            ({"weight_decay": -1.0}, "MARS(weight_decay=...): expected a float >= 0"),
            ({"gamma": -0.1}, "MARS(gamma=...): expected a float >= 0"),
            ({"clip": 0.0}, "MARS(clip=...): expected None or a positive norm"),
            ({"variant": "sgd"}, "MARS(variant=...): expected 'adamw' or 'lion'"),
        ],
    ),
    Row(
        "mars_lion",
        lambda m, **kw: MARS(
            m.parameters(),
            **{
                "lr": 0.01,
                "betas": (0.9, 0.99),
                "gamma": 0.1,
                "weight_decay": 0.01,
                "variant": "lion",
                **kw,
            },
        ),
        "plain",
        ref_mars("lion"),
        [({"lr": -1.0}, "MARS(lr=...): expected a positive learning rate")],
    ),
    Row(
        "storm",
        lambda m, **kw: STORM(m.parameters(), **{"lr": 0.05, "a": 0.3, **kw}),
        "closure",
        ref_storm,
        [
            ({"lr": 0.0}, "STORM(lr=...): expected a positive learning rate"),
            ({"a": 0.0}, "STORM(a=...): expected a momentum correction in (0, 1]"),
            ({"weight_decay": -1.0}, "STORM(weight_decay=...): expected a float >= 0"),
        ],
    ),
    Row(
        "svrg",
        lambda m, **kw: SVRG(m.parameters(), **{"lr": 0.05, **kw}),
        "svrg",
        ref_svrg,
        [
            ({"lr": 0.0}, "SVRG(lr=...): expected a positive learning rate"),
            ({"momentum": 1.0}, "SVRG(momentum=...): expected a float in [0, 1)"),
            ({"weight_decay": -1.0}, "SVRG(weight_decay=...): expected a float >= 0"),
        ],
    ),
    Row(
        "noise_adaptive",
        lambda m, **kw: NoiseAdaptive(m.named_parameters(), **{"lr": 0.05, "beta": 0.5, **kw}),
        "stats",
        ref_noise_adaptive,
        [
            ({"lr": 0.0}, "NoiseAdaptive(lr=...): expected a positive learning rate"),
            ({"base": "lamb"}, "NoiseAdaptive(base=...): expected 'sgd' or 'adam'"),
            ({"beta": 1.0}, "NoiseAdaptive(beta=...): expected a float in [0, 1)"),
            ({"floor": 0.0}, "NoiseAdaptive(floor=...): expected a gain floor in (0, 1]"),
            ({"momentum": -0.1}, "NoiseAdaptive(momentum=...): expected a float in [0, 1)"),
            ({"betas": (1.5, 0.9)}, "NoiseAdaptive(betas=...): expected two floats in [0, 1)"),
            ({"eps": -1.0}, "NoiseAdaptive(eps=...): expected a positive float"),
            ({"weight_decay": -1.0}, "NoiseAdaptive(weight_decay=...): expected a float >= 0"),
        ],
    ),
    Row(
        "vrgd",
        lambda m, **kw: VRGD(m.named_parameters(), **{"lr": 0.01, "gamma": 0.3, **kw}),
        "stats",
        ref_vrgd,
        [
            ({"lr": 0.0}, "VRGD(lr=...): expected a positive learning rate"),
            ({"gamma": 1.0}, "VRGD(gamma=...): expected a bound in [0, 1)"),
            ({"betas": (0.9,)}, "VRGD(betas=...): expected two floats in [0, 1)"),
            ({"eps": 0.0}, "VRGD(eps=...): expected a positive float"),
            ({"weight_decay": -0.5}, "VRGD(weight_decay=...): expected a float >= 0"),
        ],
    ),
]
IDS = [row.name for row in ROWS]


def run(row: Row, steps: int, start: int = 0, model=None, opt=None, **kw):
    model = model or fresh_model()
    opt = opt or row.make(model, **kw)
    for step in range(start, start + steps):
        train_step(row.kind, model, opt, step)
    return model, opt


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_converges_on_least_squares(row):
    model = fresh_model()
    start = full_loss(model)
    model, _ = run(row, 300, model=model)
    design = torch.cat([X, torch.ones(N, 1)], 1)
    solution = torch.linalg.lstsq(design, Y).solution
    optimum = float(((design @ solution - Y) ** 2).mean())
    assert full_loss(model) < optimum + 0.02 * (start - optimum)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_matches_hand_written_reference(row):
    model, _ = run(row, 5)
    params = {k: v.detach().clone() for k, v in fresh_model().named_parameters()}
    state: dict = {}
    for t in range(1, 6):
        params = row.reference(params, state, t, *batch_at(t - 1))
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), params[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_state_dict_round_trip_and_exact_resume(row):
    straight, _ = run(row, 8)
    model, opt = run(row, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = fresh_model()
    resumed.load_state_dict(saved["model"])
    opt2 = row.make(resumed)
    opt2.load_state_dict(saved["opt"])
    assert str(opt2.state_dict()) == str(opt.state_dict())
    run(row, 5, start=3, model=resumed, opt=opt2)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_works_with_lr_scheduler(row):
    model = fresh_model()
    opt = row.make(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        train_step(row.kind, model, opt, step)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(row.make(fresh_model()).defaults["lr"] / 8)


@pytest.mark.parametrize(
    ("row", "kwargs", "message"),
    [(row, kw, msg) for row in ROWS for kw, msg in row.invalid],
    ids=[f"{row.name}-{next(iter(kw))}" for row in ROWS for kw, _ in row.invalid],
)
def test_rejects_invalid_hyperparameters(row, kwargs, message):
    with pytest.raises(GradNoiseError) as info:
        row.make(fresh_model(), **kwargs)
    assert message in str(info.value) and "got" in str(info.value)
