"""Model library: DiT and its building blocks."""
from ditjax.models.archs import ARCHS, DiTConfig, dit_config
from ditjax.models.dit import DiT, ModelOutput

__all__ = ["ARCHS", "DiT", "DiTConfig", "ModelOutput", "dit_config"]
