"""Optimizers: pure functional updates plus thin ``torch.optim.Optimizer`` shells."""

from gradnoise.optim.mars import MARS, mars_correction, mars_step
from gradnoise.optim.mezo import MeZO, mezo_step, momentum_weights
from gradnoise.optim.noise_adaptive import NoiseAdaptive, noise_adaptive_step, noise_gain
from gradnoise.optim.storm import STORM, storm_step
from gradnoise.optim.svrg import SVRG, svrg_step
from gradnoise.optim.vrgd import VRGD, vrgd_scale, vrgd_step

__all__ = [
    "MARS",
    "STORM",
    "SVRG",
    "VRGD",
    "MeZO",
    "NoiseAdaptive",
    "mars_correction",
    "mars_step",
    "mezo_step",
    "momentum_weights",
    "noise_adaptive_step",
    "noise_gain",
    "storm_step",
    "svrg_step",
    "vrgd_scale",
    "vrgd_step",
]
