"""kfjax: KernelFusion (zero-shot blind super-resolution via patch diffusion) in JAX."""

__version__ = "0.1.0"
