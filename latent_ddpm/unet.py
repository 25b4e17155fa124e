"""The original project's "advanced UNet" as a diffusers model.

Architecture (unchanged from the original, see README "Moving over"): a sinusoidal time embedding
followed by a learnable MLP; down blocks of [ResNet, self-attention] x N with an optional 4x4
stride-2 downsampling conv; mid blocks of ResNet, then [attention, ResNet] x N; up blocks that
upsample with a 4x4 stride-2 transposed conv, concatenate the skip and run [ResNet, attention] x N.

What is new: attention goes through `F.scaled_dot_product_attention` (the attention matrix is never
materialised), optional class conditioning with a learned "no class" embedding for classifier-free
guidance, dropout, per-level attention switches and gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .unet_config import PRESETS, downsample_factor, validate_config

__all__ = ["PRESETS", "AdvancedUNet2DModel", "AdvancedUNet2DOutput", "downsample_factor"]

@dataclass
class AdvancedUNet2DOutput(BaseOutput):
    """Output of `AdvancedUNet2DModel.forward`: the prediction, shaped like the input sample."""

    sample: torch.Tensor


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """The original's time embedding: [sin(t / f_i), cos(t / f_i)] with f_i = 10000^(i / (dim/2))."""
    half = dim // 2
    freqs = 10000 ** (torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] / freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, + time bias, GroupNorm-SiLU-(Dropout)-Conv3x3, + 1x1-conv residual."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The original always has a 1x1 conv on the residual path, even when channels match.
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.conv_shortcut(x)


# PyTorch's CPU flash-attention kernel runs head_dim 4 or 8 up to 1.8x slower than 16 (skinny GEMMs),
# so on CPU q, k, v are zero-padded to this head width (see docs/benchmarks.md).
_CPU_MIN_HEAD_DIM = 16
# On GPUs the fused kernels need head_dim aligned to 16 bytes (PyTorch's sdp_utils.cpp,
# `minimum_gemm_alignment`): a multiple of 8 for 16-bit inputs (flash, memory-efficient), of 4 for float32
# (memory-efficient); otherwise SDPA falls back to the math kernel, which materialises the (HW)^2 scores.
_GPU_HEAD_DIM_MULTIPLE = {torch.float16: 8, torch.bfloat16: 8}
_GPU_HEAD_DIM_MULTIPLE_FP32 = 4


def _head_padding(head_dim: int, device_type: str, dtype: torch.dtype = torch.float32) -> int:
    """Zero columns to add to q, k and v (of `dtype`) so that SDPA takes a fast kernel on this device (none
    on others, e.g. "meta", where the benchmarks count the model's FLOPs)."""
    if device_type == "cpu":
        return max(0, _CPU_MIN_HEAD_DIM - head_dim)
    if device_type in ("cuda", "xpu"):
        return -head_dim % _GPU_HEAD_DIM_MULTIPLE.get(dtype, _GPU_HEAD_DIM_MULTIPLE_FP32)
    return 0


class SelfAttention(nn.Module):
    """GroupNorm, then multi-head self-attention over the H*W tokens, added back as a residual.

    Same parameters as the original `nn.MultiheadAttention` (a fused (3C, C) input projection and an
    output projection), computed with `scaled_dot_product_attention`, so memory is linear in tokens.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C): a view for channels_last inputs, one copy otherwise.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        head_dim = c // self.num_heads
        qkv = self.to_qkv(tokens).view(b, h * w, 3, self.num_heads, head_dim)
        pad = _head_padding(head_dim, x.device.type, qkv.dtype)  # qkv's dtype: autocast's, if on
        if pad > 0:
            # Exact: zero columns add nothing to q.k, and the output's padded columns are zero (dropped).
            qkv = F.pad(qkv, (0, pad))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # views, (B, heads, HW, head_dim); the kernels take the strides
        out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)[..., :head_dim]
        out = self.to_out(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)


class _Block(nn.Module):
    """A stack of (ResNet, optional attention) pairs; the base of the down, mid and up blocks."""

    def __init__(self, in_ch: int, out_ch: int, n_resnets: int, n_attn: int, temb_dim: int, heads: int,
                 groups: int, dropout: float, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups, dropout) for i in range(n_resnets)]
        )
        self.attentions = nn.ModuleList(
            [SelfAttention(out_ch, heads, groups) if attention else nn.Identity() for _ in range(n_attn)]
        )


class DownBlock(_Block):
    """num_layers x [ResNet, attention], then an optional 4x4 stride-2 conv."""

    def __init__(self, in_ch, out_ch, num_layers, downsample, **kw):
        super().__init__(in_ch, out_ch, num_layers, num_layers, **kw)
        self.downsample = nn.Conv2d(out_ch, out_ch, 4, stride=2, padding=1) if downsample else nn.Identity()

    def forward(self, x, temb):
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = attn(resnet(x, temb))
        return self.downsample(x)


class MidBlock(_Block):
    """ResNet, then num_layers x [attention, ResNet]."""

    def __init__(self, in_ch, out_ch, num_layers, **kw):
        super().__init__(in_ch, out_ch, num_layers + 1, num_layers, **kw)

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x), temb)
        return x


class UpBlock(_Block):
    """Optional 4x4 stride-2 transposed conv, concatenate the skip, then num_layers x [ResNet, attention]."""

    def __init__(self, in_ch, out_ch, num_layers, upsample, **kw):
        super().__init__(in_ch, out_ch, num_layers, num_layers, **kw)
        half = in_ch // 2
        self.upsample = nn.ConvTranspose2d(half, half, 4, stride=2, padding=1) if upsample else nn.Identity()

    def forward(self, x, skip, temb):
        x = torch.cat([self.upsample(x), skip], dim=1)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = attn(resnet(x, temb))
        return x


class TimestepEmbedding(nn.Module):
    """The original's "learnable time embedding": Linear -> SiLU -> Linear on the sinusoidal vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AdvancedUNet2DModel(ModelMixin, ConfigMixin):
    """The original project's UNet, as a diffusers model (weights in safetensors).

    Args:
        in_channels: latent channels C (the original `im_channels`); the output has as many.
        down_channels: widths of the resolution levels; block i maps down_channels[i] -> [i+1].
        mid_channels: widths through the mid blocks; must start at down_channels[-1] and end at
            down_channels[-2].
        time_emb_dim: width of the time (and class) embedding; even.
        down_sample: per down block, whether it halves H and W (len(down_channels) - 1 flags).
        num_down_layers / num_mid_layers / num_up_layers: [ResNet, attention] pairs per block.
        num_heads: attention heads at every level.
        norm_num_groups: GroupNorm groups; divides every width (8 in the original).
        sample_size: (H, W) or H of the latents the model is trained on; used by the pipeline.
        attention_levels: which levels get self-attention. Level i (0 <= i < len(down_channels) - 1)
            is down block i and its mirrored up block; level len(down_channels) - 1 is the mid
            blocks. None (default) means every level, as in the original.
        num_class_embeds: number of classes for class conditioning (None: unconditional). Label
            `num_class_embeds` (or a missing label) is the learned "no class" embedding used for
            classifier-free guidance.
        dropout: dropout before each ResNet's second conv.
        head_channels: width of the last up block, before the output GroupNorm + conv (16 in the
            original).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        down_channels: tuple[int, ...] = (32, 64, 128, 256),
        mid_channels: tuple[int, ...] = (256, 256, 128),
        time_emb_dim: int = 128,
        down_sample: tuple[bool, ...] = (True, True, False),
        num_down_layers: int = 1,
        num_mid_layers: int = 1,
        num_up_layers: int = 1,
        num_heads: int = 4,
        norm_num_groups: int = 8,
        sample_size: int | tuple[int, int] = 64,
        attention_levels: tuple[int, ...] | None = None,
        num_class_embeds: int | None = None,
        dropout: float = 0.0,
        head_channels: int = 16,
    ):
        super().__init__()
        validate_config(in_channels=in_channels, down_channels=down_channels, mid_channels=mid_channels,
                        time_emb_dim=time_emb_dim, down_sample=down_sample, num_down_layers=num_down_layers,
                        num_mid_layers=num_mid_layers, num_up_layers=num_up_layers, num_heads=num_heads,
                        norm_num_groups=norm_num_groups, sample_size=sample_size, attention_levels=attention_levels,
                        num_class_embeds=num_class_embeds, dropout=dropout, head_channels=head_channels)
        down_channels, mid_channels, down_sample = list(down_channels), list(mid_channels), list(down_sample)
        n_levels = len(down_channels) - 1
        attn = set(range(n_levels + 1) if attention_levels is None else attention_levels)
        kw = dict(temb_dim=time_emb_dim, heads=num_heads, groups=norm_num_groups, dropout=dropout)

        self.time_embedding = TimestepEmbedding(time_emb_dim)
        self.class_embedding = None
        if num_class_embeds is not None:
            # One extra row: the "no class" embedding, trained through label dropout.
            self.class_embedding = nn.Embedding(num_class_embeds + 1, time_emb_dim)
        self.conv_in = nn.Conv2d(in_channels, down_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(down_channels[i], down_channels[i + 1], num_down_layers, down_sample[i],
                      attention=i in attn, **kw)
            for i in range(n_levels)
        )
        self.mid_blocks = nn.ModuleList(
            MidBlock(mid_channels[i], mid_channels[i + 1], num_mid_layers, attention=n_levels in attn, **kw)
            for i in range(len(mid_channels) - 1)
        )
        self.up_blocks = nn.ModuleList(
            UpBlock(down_channels[i] * 2, down_channels[i - 1] if i else head_channels, num_up_layers,
                    down_sample[i], attention=i in attn, **kw)
            for i in reversed(range(n_levels))
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, head_channels)
        self.conv_out = nn.Conv2d(head_channels, in_channels, 3, padding=1)
        self.gradient_checkpointing = False

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be divisible by this."""
        return downsample_factor(self.config.down_sample)

    @property
    def null_class_label(self) -> int | None:
        """The label of the learned "no class" embedding (None when unconditional)."""
        return self.config.num_class_embeds

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> AdvancedUNet2DOutput | tuple[torch.Tensor]:
        """Predict the model target for noisy `sample` (B, C, H, W) at `timestep` (number, 0-d or (B,))."""
        b, f = sample.shape[0], self.downsample_factor
        c = self.config.in_channels  # a wrong C failed in conv_in ("expected input[...] to have 4 channels")
        if sample.ndim != 4 or sample.shape[1] != c or sample.shape[-2] % f or sample.shape[-1] % f:
            raise ValueError(f"sample must be (B, {c}, H, W) with H and W divisible by {f}, got {tuple(sample.shape)}")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(1).expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"timestep must be a number, a 0-d tensor or shape ({b},), got {tuple(t.shape)}")
        emb = self.time_embedding(sinusoidal_embedding(t, self.config.time_emb_dim).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.null_class_label, device=sample.device, dtype=torch.long)
            class_labels = torch.as_tensor(class_labels, device=sample.device)
            if class_labels.shape != (b,) or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                # shape and dtype only: a range check would synchronise with the device at every step
                raise ValueError(f"class_labels must be ({b},) integer ids in 0..{self.null_class_label} (the last "
                                 f"is 'no class'), got {class_labels.dtype} of shape {tuple(class_labels.shape)}")
            emb = emb + self.class_embedding(class_labels.long()).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but the model is unconditional (num_class_embeds=None)")

        x = self.conv_in(sample)
        skips = []
        for block in self.down_blocks:
            skips.append(x)
            x = self._run(block, x, emb)
        for block in self.mid_blocks:
            x = self._run(block, x, emb)
        for block in self.up_blocks:
            x = self._run(block, x, skips.pop(), emb)
        out = self.conv_out(F.silu(self.norm_out(x)))
        return AdvancedUNet2DOutput(sample=out) if return_dict else (out,)

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AdvancedUNet2DModel:
        """Build a model from a named preset (see `PRESETS`), with any config value overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_original_checkpoint(cls, path, **config) -> AdvancedUNet2DModel:
        """Convert an original project checkpoint (`model.pth`, `ddpm_epoch_N.pt`); see convert_original."""
        from .convert_original import load_original_checkpoint

        return load_original_checkpoint(path, cls, **config)
