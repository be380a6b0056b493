"""caldm: CA-LDM (cascaded amortized latent diffusion) for high-resolution OCT volumes."""

__version__ = "0.1.0"
