"""Moments, the quantities computed from them, and the GradStats engine."""

from gradnoise.stats.engine import GradStats
from gradnoise.stats.moments import GradMoments, merge_all, total_moments
from gradnoise.stats.quantities import (
    NoiseScaleEstimate,
    NormTestResult,
    elementwise_variance,
    gradient_noise_scale,
    gsnr,
    layer_gsnr,
    noise_scale_per_layer,
    norm_test,
    trace_covariance,
    two_batch_estimates,
)

__all__ = [
    "GradMoments",
    "GradStats",
    "NoiseScaleEstimate",
    "NormTestResult",
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
