"""Optimizers: pure functional updates plus thin ``torch.optim.Optimizer`` shells."""

from gradnoise.optim.mezo import MeZO, mezo_step, momentum_weights

__all__ = ["MeZO", "mezo_step", "momentum_weights"]
