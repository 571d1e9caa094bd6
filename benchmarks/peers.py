"""One training step per method, for the overhead benchmark: gradnoise and its peers.

Every factory takes ``(model, batch, loss_fn)`` and returns ``(step, covered)``: ``step()`` runs one
forward and backward and extracts per-example squared norms (and the noise scale where the method
gives what it needs), ``covered()`` counts the parameter tensors whose per-example statistics the
method produced on the last step. Peers are optional: a missing one raises ImportError.

``gradnoise`` and ``opacus_ghost`` also take ``on_step``: called after every step with the step's
``GradStats`` / the Opacus-wrapped module, for benchmarks that want more than the timing (coverage,
the norms themselves); it is meant to do its work once and return at once afterwards.
"""

from __future__ import annotations

import copy


def plain(model, batch, loss_fn):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model, *batch).backward()

    return step, lambda: 0


def gradnoise(model, batch, loss_fn, *, elementwise=False, on_step=None):
    from gradnoise import GradStats

    last = {}

    def step():
        model.zero_grad(set_to_none=True)
        with GradStats(model, elementwise=elementwise) as stats:
            loss_fn(model, *batch).backward()
        last["norms"] = stats.per_example_sq_norms()
        last["gns"] = stats.noise_scale()
        if elementwise:
            last["moments"] = stats.moments()
        if on_step is not None:
            on_step(stats)

    return step, lambda: len(last["norms"])


def gradnoise_elementwise(model, batch, loss_fn):
    return gradnoise(model, batch, loss_fn, elementwise=True)


def _backpack(model, batch, loss_fn, extension_name):
    from backpack import backpack, extend, extensions

    model = extend(copy.deepcopy(model), use_converter=False)
    extension = getattr(extensions, extension_name)()
    attribute = {"BatchL2Grad": "batch_l2", "Variance": "variance"}[extension_name]

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, *batch)
        with backpack(extension):
            loss.backward()

    def covered():
        return sum(getattr(p, attribute, None) is not None for p in model.parameters())

    return step, covered


def backpack_l2(model, batch, loss_fn):
    return _backpack(model, batch, loss_fn, "BatchL2Grad")


def backpack_variance(model, batch, loss_fn):
    return _backpack(model, batch, loss_fn, "Variance")


def opacus_ghost(model, batch, loss_fn, *, on_step=None):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), loss_reduction="mean", use_ghost_clipping=True
    )
    last = {}

    def step():
        wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped, *batch).backward()
        last["norms"] = wrapped.get_norm_sample()
        if on_step is not None:
            on_step(wrapped)

    def covered():
        return sum(hasattr(p, "_norm_sample") for p in wrapped.parameters())

    return step, covered


def functorch_vmap(model, batch, loss_fn):
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def one_example(p, *example):
        return loss_fn(lambda *a: functional_call(model, p, a), *(t.unsqueeze(0) for t in example))

    per_example = vmap(grad(one_example), in_dims=(None, *[0] * len(batch)))
    last = {}

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model, *batch).backward()  # the training gradient itself
        grads = per_example(params, *batch)
        last["norms"] = {name: g.flatten(1).pow(2).sum(1) for name, g in grads.items()}

    return step, lambda: len(last["norms"])


METHODS = {
    "plain": plain,
    "gradnoise": gradnoise,
    "gradnoise_elementwise": gradnoise_elementwise,
    "backpack_l2": backpack_l2,
    "backpack_variance": backpack_variance,
    "opacus_ghost": opacus_ghost,
    "functorch_vmap": functorch_vmap,
}

__all__ = ["METHODS"]
