"""refit: ReFiT fine-tuning of diffusion recommenders on top of refit_kernels.

The thin layer that uses the kernels: data loading, models, diffusion,
training, evaluation and the command line. It imports refit_kernels; the
kernels never import it.
"""

__version__ = "0.1.0"
