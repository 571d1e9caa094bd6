"""Per-example versions of the test models' mean losses, for code that needs ``(B,)`` losses.

Every builder in :mod:`gradnoise.testing.models` and :mod:`gradnoise.testing.hf_models` returns a
``loss_fn(model, *batch)`` that is the mean over the batch of per-example losses;
:func:`per_example_loss` gives the function that returns those per-example losses themselves,
computed in one forward from the logits, so ``per_example_loss(f)(model, *batch).mean()`` equals
``f(model, *batch)`` (tested in tests/stats/test_clipping.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.testing import hf_models, models

__all__ = ["per_example_loss"]


def _classification(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _tokens(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).mean(1)


def _causal_lm(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The library's shifted loss, kept per sequence: token t predicts token t + 1."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).mean(1)


def _sequence_classification(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=input_ids).logits, labels, reduction="none")


def _pixels(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(pixel_values=pixel_values).logits, labels, reduction="none")


_PER_EXAMPLE: dict[Callable, Callable] = {
    models.classification_loss: _classification,
    models.lm_loss: _tokens,
    hf_models.lm_loss: _causal_lm,
    hf_models.sequence_classification_loss: _sequence_classification,
    hf_models.pixel_loss: _pixels,
    hf_models._classification_loss: _classification,
}


def per_example_loss(loss_fn: Callable) -> Callable[..., torch.Tensor]:
    """``(model, *batch) -> (B,)`` losses whose mean is ``loss_fn(model, *batch)``."""
    try:
        return _PER_EXAMPLE[loss_fn]
    except KeyError:
        raise KeyError(
            f"no per-example version of {getattr(loss_fn, '__name__', loss_fn)!r}: "
            f"known are {sorted(f.__name__ for f in _PER_EXAMPLE)}"
        ) from None
