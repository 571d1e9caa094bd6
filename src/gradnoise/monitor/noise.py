"""The running noise scale the monitor uses: ``gradnoise.stats.running.NoiseScale`` when present,
else the private stand-in in :mod:`gradnoise.monitor._running` (same contract)."""

try:
    from gradnoise.stats.running import NoiseScale, NoiseScaleReading
except ImportError:  # issue 3 not landed yet
    from gradnoise.monitor._running import NoiseScale, NoiseScaleReading

__all__ = ["NoiseScale", "NoiseScaleReading"]
