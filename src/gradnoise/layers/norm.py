r"""Normalization layers: ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``, and ``F.batch_norm``
with running statistics (eval mode: a fixed per-channel affine map of each example).

With :math:`\hat x` the normalized input before the affine transform, the per-example gradients
are reductions over the positions of one example:

.. math::
    \nabla_\gamma l_i = \sum_{t} g_{it} \odot \hat x_{it}, \qquad \nabla_\beta l_i = \sum_t g_{it}.

:math:`\hat x` is recomputed in backward from the saved input (an elementwise pass), so the
forward stays exactly PyTorch's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.layers.registry import (
    BaseRule,
    Pieces,
    Request,
    pieces_from_per_example,
    register,
)

__all__ = ["AffineNormRule"]


def _affine_pieces(
    normalized, grad_output, param_dims: int, channel_dim: int | None, roles, request
):
    """Pieces of gamma (``weight``) and beta (``bias``) from x_hat and the output gradient.

    ``param_dims`` trailing dims carry the parameter (layer/RMS norm); with ``channel_dim`` set,
    the parameter lives on that dim instead (group norm over (B, C, *)).
    """
    batch = grad_output.shape[0]
    if channel_dim is None:
        shape = grad_output.shape[grad_output.dim() - param_dims :]
        flatten = lambda t: t.reshape(batch, -1, *shape).sum(1)  # noqa: E731
    else:
        flatten = lambda t: t.reshape(batch, t.shape[1], -1).sum(2)  # noqa: E731
    pieces = {}
    if "weight" in roles:
        pieces["weight"] = pieces_from_per_example(
            flatten(grad_output * normalized), request, "direct"
        )
    if "bias" in roles:
        pieces["bias"] = pieces_from_per_example(flatten(grad_output), request, "direct")
    return pieces


def _layer_norm_args(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return locals()


def _rms_norm_args(input, normalized_shape, weight=None, eps=None):
    return locals()


def _group_norm_args(input, num_groups, weight=None, bias=None, eps=1e-5):
    return locals()


def _batch_norm_args(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    return locals()


class AffineNormRule(BaseRule):
    """A normalization followed by an elementwise affine map; ``x_hat`` is the op without it.

    The parameter lives on the trailing ``normalized_shape`` dims (layer and RMS norm) or on the
    channel dim 1 (group norm, ``channel_first=True``).
    """

    def __init__(
        self, name, function, binder, param_roles, cases, *, modules=(), channel_first=False
    ):
        self.name, self.function, self.param_roles = name, function, param_roles
        self.modules = modules
        self.intercepts = (function,)
        self._binder, self._channel_first, self._cases = binder, channel_first, cases

    def bind(self, *args, **kwargs) -> dict[str, Any]:
        return self._binder(*args, **kwargs)

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return self.function(**bound)

    def contract_cases(self):
        return [
            (label, build().double(), (torch.randn(*shape).double(),))
            for label, build, shape in self._cases
        ]

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        normalized = self.function(**{**bound, **dict.fromkeys(self.param_roles)})
        if self._channel_first:
            return _affine_pieces(normalized, grad_output, 1, 1, roles, request)
        dims = len(tuple(bound["normalized_shape"]))
        return _affine_pieces(normalized, grad_output, dims, None, roles, request)


class RunningBatchNormRule(AffineNormRule):
    """``F.batch_norm`` with running statistics: ``y = (x - mean) / sqrt(var + eps) * w + b``
    per channel, a fixed affine map, so the input gradient is one product and the op runs as
    one autograd node (no copy of the output, no second backward)."""

    gives_input_grad = True

    def input_grad(self, bound: dict[str, Any], grad_output: torch.Tensor, roles=()):
        scale = (bound["running_var"] + bound["eps"]).rsqrt()
        if bound["weight"] is not None:
            scale = scale * bound["weight"]
        shape = (1, -1) + (1,) * (grad_output.dim() - 2)
        return grad_output * scale.view(shape)


def _eval_batch_norm(channels: int) -> nn.Module:
    norm = nn.BatchNorm2d(channels)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    return norm.eval()


register(
    AffineNormRule(
        "layer_norm",
        F.layer_norm,
        _layer_norm_args,
        ("weight", "bias"),
        [
            ("layer_norm", lambda: nn.LayerNorm(4), (5, 3, 4)),
            ("layer_norm 2-d", lambda: nn.LayerNorm((3, 4)), (5, 3, 4)),
        ],
        modules=(nn.LayerNorm,),
    )
)
register(
    AffineNormRule(
        "rms_norm",
        F.rms_norm,
        _rms_norm_args,
        ("weight",),
        [("rms_norm", lambda: nn.RMSNorm(4), (5, 3, 4))],
        modules=(nn.RMSNorm,),
    )
)
register(
    AffineNormRule(
        "group_norm",
        F.group_norm,
        _group_norm_args,
        ("weight", "bias"),
        [("group_norm", lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3))],
        modules=(nn.GroupNorm,),
        channel_first=True,
    )
)
register(
    RunningBatchNormRule(
        "batch_norm (running statistics)",
        F.batch_norm,
        _batch_norm_args,
        ("weight", "bias"),
        [
            ("batch_norm eval 2-d", lambda: _eval_batch_norm(3), (5, 3, 4, 4)),
            ("batch_norm eval 1-d", lambda: nn.BatchNorm1d(3).eval(), (5, 3)),
        ],
        modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        channel_first=True,
    )
)
