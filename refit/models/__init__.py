"""Denoisers of the reverse diffusion process."""

from .diffrec import DiffRecMLP, timestep_embedding

__all__ = ["DiffRecMLP", "timestep_embedding"]
