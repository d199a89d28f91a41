"""Training objectives (DDPM with learned variance, flow matching) and their samplers."""
from ditjax.diffusion.ddpm import GaussianDiffusion, space_timesteps
from ditjax.diffusion.flow import FlowMatching
from ditjax.diffusion.guidance import GuidanceConfig
from ditjax.diffusion.samplers import SAMPLERS, sample

__all__ = ["FlowMatching", "GaussianDiffusion", "GuidanceConfig", "SAMPLERS", "sample", "space_timesteps"]
