"""gradnoise: measure, estimate and exploit the noise in stochastic gradients (PyTorch).

The public facade. Everything listed in ``__all__`` is a stable entry point; submodules
(``gradnoise.stats``, ``gradnoise.layers``, ``gradnoise.testing``) hold the rest.
"""

from gradnoise.errors import (
    BatchCouplingError,
    GradNoiseError,
    NotReadyError,
    UnsupportedModuleError,
)
from gradnoise.stats import (
    GradMoments,
    GradStats,
    NoiseScaleEstimate,
    NormTestResult,
    elementwise_variance,
    gradient_noise_scale,
    gsnr,
    layer_gsnr,
    merge_all,
    noise_scale_per_layer,
    norm_test,
    total_moments,
    trace_covariance,
    two_batch_estimates,
)

__version__ = "0.1.0"

__all__ = [
    "BatchCouplingError",
    "GradMoments",
    "GradNoiseError",
    "GradStats",
    "NoiseScaleEstimate",
    "NormTestResult",
    "NotReadyError",
    "UnsupportedModuleError",
    "__version__",
    "elementwise_variance",
    "gradient_noise_scale",
    "gsnr",
    "layer_gsnr",
    "merge_all",
    "noise_scale_per_layer",
    "norm_test",
    "total_moments",
    "trace_covariance",
    "two_batch_estimates",
]
