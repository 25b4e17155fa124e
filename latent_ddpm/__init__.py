"""latent-ddpm: train and sample diffusion models on precomputed latents."""

from . import hybrid_solver  # noqa: F401 - a saved pipeline names it: diffusers loads it once imported
from .pipeline import LatentDDPMPipeline, LatentPipelineOutput, default_scheduler
from .unet import PRESETS, AdvancedUNet2DModel

__version__ = "0.1.0"
__all__ = ["AdvancedUNet2DModel", "LatentDDPMPipeline", "LatentPipelineOutput", "PRESETS", "default_scheduler"]
