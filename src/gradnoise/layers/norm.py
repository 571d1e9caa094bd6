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

from gradnoise.layers.registry import Pieces, Request, pieces_from_per_example, register

__all__ = ["GroupNormRule", "LayerNormRule", "RMSNormRule"]


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


class LayerNormRule:
    name = "layer_norm"
    param_roles = ("weight", "bias")

    def bind(self, input, normalized_shape, weight=None, bias=None, eps=1e-5) -> dict[str, Any]:
        return {
            "input": input,
            "normalized_shape": normalized_shape,
            "weight": weight,
            "bias": bias,
            "eps": eps,
        }

    def check(self, bound: dict[str, Any]) -> None:
        pass

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        return F.layer_norm(**bound)

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        shape = tuple(bound["normalized_shape"])
        normalized = F.layer_norm(bound["input"], shape, None, None, bound["eps"])
        return _affine_pieces(normalized, grad_output, len(shape), None, roles, request)


class RMSNormRule:
    name = "rms_norm"
    param_roles = ("weight",)

    def bind(self, input, normalized_shape, weight=None, eps=None) -> dict[str, Any]:
        return {"input": input, "normalized_shape": normalized_shape, "weight": weight, "eps": eps}

    def check(self, bound: dict[str, Any]) -> None:
        pass

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        return F.rms_norm(**bound)

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        shape = tuple(bound["normalized_shape"])
        normalized = F.rms_norm(bound["input"], shape, None, bound["eps"])
        return _affine_pieces(normalized, grad_output, len(shape), None, roles, request)


class GroupNormRule:
    name = "group_norm"
    param_roles = ("weight", "bias")

    def bind(self, input, num_groups, weight=None, bias=None, eps=1e-5) -> dict[str, Any]:
        return {
            "input": input,
            "num_groups": num_groups,
            "weight": weight,
            "bias": bias,
            "eps": eps,
        }

    def check(self, bound: dict[str, Any]) -> None:
        pass

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        return F.group_norm(**bound)

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        normalized = F.group_norm(bound["input"], bound["num_groups"], None, None, bound["eps"])
        return _affine_pieces(normalized, grad_output, 1, 1, roles, request)


register(LayerNormRule(), F.layer_norm)
register(RMSNormRule(), F.rms_norm)
register(GroupNormRule(), F.group_norm)
