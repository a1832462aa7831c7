"""NoiseRefine at scale: distil diffusion guidance into the initial noise."""

__version__ = "0.1.0"
