r"""Normalization layers: ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``.

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


class AffineNormRule(BaseRule):
    """A normalization followed by an elementwise affine map; ``x_hat`` is the op without it.

    The parameter lives on the trailing ``normalized_shape`` dims (layer and RMS norm) or on the
    channel dim 1 (group norm, ``channel_first=True``).
    """

    def __init__(self, name, function, binder, param_roles, *, channel_first=False) -> None:
        self.name, self.function, self.param_roles = name, function, param_roles
        self._binder, self._channel_first = binder, channel_first

    def bind(self, *args, **kwargs) -> dict[str, Any]:
        return self._binder(*args, **kwargs)

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        return self.function(**bound)

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        normalized = self.function(**{**bound, **dict.fromkeys(self.param_roles)})
        if self._channel_first:
            return _affine_pieces(normalized, grad_output, 1, 1, roles, request)
        dims = len(tuple(bound["normalized_shape"]))
        return _affine_pieces(normalized, grad_output, dims, None, roles, request)


register(
    AffineNormRule("layer_norm", F.layer_norm, _layer_norm_args, ("weight", "bias")), F.layer_norm
)
register(AffineNormRule("rms_norm", F.rms_norm, _rms_norm_args, ("weight",)), F.rms_norm)
register(
    AffineNormRule(
        "group_norm", F.group_norm, _group_norm_args, ("weight", "bias"), channel_first=True
    ),
    F.group_norm,
)
