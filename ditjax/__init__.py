"""ditjax: pretraining Diffusion Transformers in JAX/Flax."""
__version__ = "0.1.0"
