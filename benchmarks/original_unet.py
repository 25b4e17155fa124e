"""A faithful re-implementation of the original project's UNet (`advanced_unet.py`), for tests and benchmarks.

Written from /work/shared/seed/ORIGIN.md: same modules, same state-dict keys and shapes
(`original_unet_state_dict.tsv`), same computation, including `nn.MultiheadAttention`, which
materialises the full (H*W, H*W) attention matrix. It is a reference only: the package never
imports it; `latent_ddpm.AdvancedUNet2DModel` is the maintained model.

    model = Unet({"im_channels": 4, "down_channels": [32, 64, 128, 256], "mid_channels": [256, 256, 128],
                  "time_emb_dim": 128, "down_sample": [True, True, False],
                  "num_down_layers": 1, "num_mid_layers": 1, "num_up_layers": 1})
"""

from __future__ import annotations

import torch
from torch import nn

#: The training script's config (`--n_dim 4`); its upstream default used 2 layers per block.
ORIGINAL_CONFIG = {
    "im_channels": 4,
    "down_channels": [32, 64, 128, 256],
    "mid_channels": [256, 256, 128],
    "time_emb_dim": 128,
    "down_sample": [True, True, False],
    "num_down_layers": 1,
    "num_mid_layers": 1,
    "num_up_layers": 1,
}


def get_time_embedding(time_steps: torch.Tensor, temb_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, temb_dim): first half sin, second half cos."""
    assert temb_dim % 2 == 0, "time embedding dimension must be divisible by 2"
    factor = 10000 ** (
        torch.arange(start=0, end=temb_dim // 2, dtype=torch.float32, device=time_steps.device) / (temb_dim // 2)
    )
    t_emb = time_steps[:, None].repeat(1, temb_dim // 2) / factor
    return torch.cat([torch.sin(t_emb), torch.cos(t_emb)], dim=-1)


class _ResnetAttention(nn.Module):
    """The original's per-block module lists: ResNet layers (+ time bias, 1x1 residual) and attention."""

    def __init__(self, in_channels: int, out_channels: int, t_emb_dim: int, num_heads: int,
                 n_resnets: int, n_attn: int):
        super().__init__()
        self.resnet_conv_first = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(8, in_channels if i == 0 else out_channels),
                nn.SiLU(),
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, stride=1, padding=1),
            )
            for i in range(n_resnets)
        )
        self.t_emb_layers = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(t_emb_dim, out_channels)) for _ in range(n_resnets)
        )
        self.resnet_conv_second = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(8, out_channels),
                nn.SiLU(),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1),
            )
            for _ in range(n_resnets)
        )
        self.attention_norms = nn.ModuleList(nn.GroupNorm(8, out_channels) for _ in range(n_attn))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(out_channels, num_heads, batch_first=True) for _ in range(n_attn)
        )
        self.residual_input_conv = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=1) for i in range(n_resnets)
        )

    def resnet(self, i: int, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        out = self.resnet_conv_first[i](x)
        out = out + self.t_emb_layers[i](t_emb)[:, :, None, None]
        out = self.resnet_conv_second[i](out)
        return out + self.residual_input_conv[i](x)

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        in_attn = self.attention_norms[i](x.reshape(b, c, h * w)).transpose(1, 2)
        out_attn, _ = self.attentions[i](in_attn, in_attn, in_attn)
        return x + out_attn.transpose(1, 2).reshape(b, c, h, w)


class DownBlock(_ResnetAttention):
    """num_layers x [ResNet, attention], then a 4x4 stride-2 conv if `down_sample`."""

    def __init__(self, in_channels, out_channels, t_emb_dim, down_sample, num_heads, num_layers):
        super().__init__(in_channels, out_channels, t_emb_dim, num_heads, num_layers, num_layers)
        self.num_layers = num_layers
        self.down_sample_conv = nn.Conv2d(out_channels, out_channels, 4, 2, 1) if down_sample else nn.Identity()

    def forward(self, x, t_emb):
        out = x
        for i in range(self.num_layers):
            out = self.attention(i, self.resnet(i, out, t_emb))
        return self.down_sample_conv(out)


class MidBlock(_ResnetAttention):
    """ResNet, then num_layers x [attention, ResNet]."""

    def __init__(self, in_channels, out_channels, t_emb_dim, num_heads, num_layers):
        super().__init__(in_channels, out_channels, t_emb_dim, num_heads, num_layers + 1, num_layers)
        self.num_layers = num_layers

    def forward(self, x, t_emb):
        out = self.resnet(0, x, t_emb)
        for i in range(self.num_layers):
            out = self.resnet(i + 1, self.attention(i, out), t_emb)
        return out


class UpBlock(_ResnetAttention):
    """4x4 stride-2 transposed conv if `up_sample`, concatenate the skip, then num_layers x [ResNet, attention]."""

    def __init__(self, in_channels, out_channels, t_emb_dim, up_sample, num_heads, num_layers):
        super().__init__(in_channels, out_channels, t_emb_dim, num_heads, num_layers, num_layers)
        self.num_layers = num_layers
        self.up_sample_conv = (
            nn.ConvTranspose2d(in_channels // 2, in_channels // 2, 4, 2, 1) if up_sample else nn.Identity()
        )

    def forward(self, x, out_down, t_emb):
        out = torch.cat([self.up_sample_conv(x), out_down], dim=1)
        for i in range(self.num_layers):
            out = self.attention(i, self.resnet(i, out, t_emb))
        return out


class Unet(nn.Module):
    """The original UNet, built from its `model_config` dict (keys as in `ORIGINAL_CONFIG`)."""

    def __init__(self, model_config: dict):
        super().__init__()
        im_channels = model_config["im_channels"]
        self.down_channels = list(model_config["down_channels"])
        self.mid_channels = list(model_config["mid_channels"])
        self.t_emb_dim = model_config["time_emb_dim"]
        self.down_sample = list(model_config["down_sample"])
        self.num_down_layers = model_config["num_down_layers"]
        self.num_mid_layers = model_config["num_mid_layers"]
        self.num_up_layers = model_config["num_up_layers"]
        assert self.mid_channels[0] == self.down_channels[-1]
        assert self.mid_channels[-1] == self.down_channels[-2]
        assert len(self.down_sample) == len(self.down_channels) - 1

        self.t_proj = nn.Sequential(
            nn.Linear(self.t_emb_dim, self.t_emb_dim), nn.SiLU(), nn.Linear(self.t_emb_dim, self.t_emb_dim)
        )
        self.up_sample = list(reversed(self.down_sample))
        self.conv_in = nn.Conv2d(im_channels, self.down_channels[0], kernel_size=3, padding=1)
        self.downs = nn.ModuleList(
            DownBlock(self.down_channels[i], self.down_channels[i + 1], self.t_emb_dim, self.down_sample[i],
                      num_heads=4, num_layers=self.num_down_layers)
            for i in range(len(self.down_channels) - 1)
        )
        self.mids = nn.ModuleList(
            MidBlock(self.mid_channels[i], self.mid_channels[i + 1], self.t_emb_dim, num_heads=4,
                     num_layers=self.num_mid_layers)
            for i in range(len(self.mid_channels) - 1)
        )
        self.ups = nn.ModuleList(
            UpBlock(self.down_channels[i] * 2, self.down_channels[i - 1] if i != 0 else 16, self.t_emb_dim,
                    self.down_sample[i], num_heads=4, num_layers=self.num_up_layers)
            for i in reversed(range(len(self.down_channels) - 1))
        )
        self.norm_out = nn.GroupNorm(8, 16)
        self.conv_out = nn.Conv2d(16, im_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        out = self.conv_in(x)
        t_emb = self.t_proj(get_time_embedding(torch.as_tensor(t).long(), self.t_emb_dim))
        down_outs = []
        for down in self.downs:
            down_outs.append(out)
            out = down(out, t_emb)
        for mid in self.mids:
            out = mid(out, t_emb)
        for up in self.ups:
            out = up(out, down_outs.pop(), t_emb)
        out = nn.SiLU()(self.norm_out(out))
        return self.conv_out(out)
