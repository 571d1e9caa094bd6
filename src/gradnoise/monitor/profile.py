"""``gradnoise profile``: train a workload with a Monitor and write the report.

A user's own model comes from a factory named ``MODULE:FACTORY`` (a module importable from the
current directory, or a path to a ``.py`` file: ``path/to/file.py:make``). The factory is called as
``factory(batch_size=B)`` and returns either a :class:`gradnoise.workloads.Workload` or a tuple
``(model, batches, loss_fn)``: an ``nn.Module``, an iterable of batches (tuples of tensors with
the examples on dim 0) and ``loss_fn(model, batch)`` returning the mean loss over the batch.

A finite re-iterable ``batches`` (a list, a ``DataLoader``) is cycled: each time it ends it is
iterated again (one more epoch) until the requested number of steps has run. A one-shot iterator
(a generator) cannot be restarted; if it runs out, the run ends early and says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.monitor.checks import check_out_dir
from gradnoise.monitor.monitor import Monitor
from gradnoise.workloads import Workload

__all__ = [
    "DEFAULT_LR",
    "as_workload",
    "check_run",
    "cycle_batches",
    "heldout_loss",
    "load_factory",
    "run_profile",
]

DEFAULT_LR = 1e-3  # AdamW learning rate of a (model, batches, loss_fn) factory without --lr


def _factory_error(spec: str, got: str, fix: str) -> GradNoiseError:
    return GradNoiseError(
        explain(
            f"--model {spec}",
            expected="MODULE:FACTORY naming a function "
            "that returns a Workload or (model, batches, loss_fn)",
            got=got,
            fix=fix,
        )
    )


def _import(module_name: str):
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_factory(spec: str):
    """Import ``MODULE:FACTORY`` and return the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _factory_error(
            spec,
            "no ':' between module and function",
            "write it as my_package.my_module:make_workload, or pass the path of a local "
            "transformers config.json or model directory",
        )
    try:
        module = _import(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise _factory_error(
            spec,
            f"a module that cannot be imported ({exc})",
            "run from the directory that holds the module, or install it",
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise _factory_error(
            spec,
            f"no function {attr!r} in module {module_name!r}",
            "check the function name after the ':'",
        )
    _check_signature(spec, attr, factory)
    return factory


def _check_signature(spec: str, attr: str, factory) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind(batch_size=2)
    except TypeError as exc:
        raise _factory_error(
            spec,
            f"{attr}{signature}, which cannot be called as {attr}(batch_size=B) ({exc})",
            "check the function name after the ':', and give the factory a batch_size "
            "parameter: def make(batch_size): ...",
        ) from exc


def cycle_batches(batches: Iterable) -> Iterator:
    """Batches of ``batches`` without end: a re-iterable one is iterated again each epoch.

    A one-shot iterator (``iter(b) is b``) cannot be restarted and simply ends; so does an
    iterable whose epoch yields nothing (no endless loop on an empty DataLoader).
    """
    if isinstance(batches, Iterator):
        yield from batches
        return
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def as_workload(result, spec: str = "factory") -> Workload:
    """Check a factory's return value and wrap a ``(model, batches, loss_fn)`` tuple."""
    if isinstance(result, Workload):
        return result
    shape = type(result).__name__
    if isinstance(result, tuple) and len(result) == 3:
        model, batches, loss = result
        if isinstance(model, nn.Module) and isinstance(batches, Iterable) and callable(loss):
            return Workload(
                name=spec, model=model, batches=cycle_batches(batches), loss=loss, lr=DEFAULT_LR
            )
        shape = f"({type(model).__name__}, {type(batches).__name__}, {type(loss).__name__})"
    raise _factory_error(
        spec,
        f"a return value of type {shape}",
        "return (model: nn.Module, batches: iterable of tuples of tensors, "
        "loss_fn: callable(model, batch) -> mean loss)",
    )


def check_run(steps: int, every: int) -> None:
    if not isinstance(steps, int) or steps < every:
        raise GradNoiseError(
            explain(
                "--steps",
                expected=f"an int >= --every ({every}), so at least one step is measured",
                got=repr(steps),
                fix="raise --steps or lower --every",
            )
        )


def run_profile(
    workload: Workload,
    *,
    steps: int,
    every: int,
    out: str | Path,
    console: bool = True,
    tensorboard: bool = True,
    lr: float | None = None,
) -> dict:
    """Train ``workload`` for ``steps`` AdamW steps under a Monitor; returns the run record.

    ``lr`` overrides ``workload.lr``. The run record's ``steps`` is the number of steps that
    ran: fewer than ``steps`` only when a one-shot batch iterator ran out (then
    ``batches_exhausted`` is true).
    """
    check_run(steps, every)
    lr = workload.lr if lr is None else _check_lr(lr)
    out = check_out_dir(out, create=False)
    monitor = Monitor(
        workload.model,
        out=out,
        every=every,
        console=console,
        total_steps=steps,
        tensorboard=tensorboard,
    )
    monitor.meta = {
        "workload": workload.name,
        "description": workload.description,
        "lr": lr,
        "steps_requested": steps,
        "loss_floor": workload.loss_floor,
        "optimizer": "AdamW",
    }
    optimizer = torch.optim.AdamW(workload.model.parameters(), lr=lr)
    done = 0
    try:
        done = _train(workload, monitor, optimizer, steps)
    finally:
        monitor.meta["batches_exhausted"] = done < steps
        run = monitor.close()
    return run | {"report": str(out / "report.html")}


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise GradNoiseError(
            explain(
                "--lr",
                expected="a positive finite learning rate",
                got=repr(lr),
                fix=f"pass for example --lr {DEFAULT_LR:g}",
            )
        )
    return float(lr)


def heldout_loss(workload: Workload) -> float | None:
    """The loss on ``workload.heldout`` (no gradients, model in eval mode for the call)."""
    if workload.heldout is None:
        return None
    training = workload.model.training
    workload.model.eval()
    try:
        with torch.no_grad():
            return float(workload.loss(workload.model, workload.heldout))
    finally:
        workload.model.train(training)


def _train(workload: Workload, monitor: Monitor, optimizer, steps: int) -> int:
    done = 0
    for _, batch in zip(range(steps), workload.batches, strict=False):
        # Held-out loss before the measured step's update, outside its timing.
        heldout = heldout_loss(workload) if monitor.measuring() else None
        with monitor.step() as step:
            loss = workload.loss(workload.model, batch)
            loss.backward()
            step.loss = loss
            if heldout is not None:
                step.extras["heldout_loss"] = heldout
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
    return done
