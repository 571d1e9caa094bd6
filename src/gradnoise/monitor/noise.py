"""The running noise scale the monitor feeds: :class:`gradnoise.stats.running.NoiseScale`."""

from gradnoise.stats.running import NoiseScale, NoiseScaleReading

__all__ = ["NoiseScale", "NoiseScaleReading"]
