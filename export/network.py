"""The DF5T network: a time-conditioned Restormer (REFERENCE.md section 2).

Module and parameter names follow the published state dict exactly, so a published
checkpoint loads strictly. The network takes ``x`` [B,3,H,W] on the [-1,1] scale and the raw
timestep index ``t`` [B] and returns [B, out_channels, H, W]; with ``learn_sigma`` the first
three channels are the predicted noise and the last three the (unused) variance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Channel multipliers of the four encoder levels.
LEVEL_MULTIPLIERS = (1, 2, 4, 8)


@dataclass(frozen=True)
class NetworkConfig:
    """The shape of a DF5T network; everything else is learned."""

    num_channels: int  # C, width of the first level
    num_res_blocks: int  # N, transformer blocks per level and in the refinement
    num_heads: int  # h0, attention heads of the first level
    learn_sigma: bool = True  # six output channels (eps and variance) instead of three

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the raw timestep index, cos half first, computed in float32."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.time_embed = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.channels))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every pixel (biased variance, eps 1e-5), computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = _Affine(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mu = xf.mean(dim=1, keepdim=True)
        var = (xf - mu).square().mean(dim=1, keepdim=True)
        normed = (xf - mu) * torch.rsqrt(var + 1e-5)
        weight, bias = self.body.weight.float(), self.body.bias.float()
        return (normed * weight[None, :, None, None] + bias[None, :, None, None]).to(x.dtype)


class _Affine(nn.Module):
    """Holds the norm's weight and bias under the published names ``body.weight``/``body.bias``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class ChannelAttention(nn.Module):
    """Multi-head attention across channels, conditioned on the timestep embedding."""

    def __init__(self, dim: int, heads: int, temb_dim: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)
        self.time_proj = nn.Linear(temb_dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        x = x + self.time_proj(temb).to(x.dtype)[:, :, None, None]
        # Tile-wide context: the 8x8 pooled map, resized back and added to every pixel.
        x = x + _upsample_bilinear(F.adaptive_avg_pool2d(x, (8, 8)), (h, w))
        # -1 for the batch keeps exported reshapes free of shape arithmetic.
        q, k, v = (
            z.reshape(-1, self.heads, c // self.heads, h * w)
            for z in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        )
        # Normalisation, similarities and softmax in float32 whatever the storage precision.
        q, k = _l2_normalize(q.float()), _l2_normalize(k.float())
        logits = (q @ k.transpose(-2, -1)) * self.temperature.float()
        attn = torch.softmax(logits, dim=-1).to(v.dtype)
        return self.project_out((attn @ v).reshape(-1, c, h, w))


def _l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """``F.normalize`` along the last axis, spelt so that the export needs no Expand."""
    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)


def _upsample_bilinear(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of the 8x8 pooled map back to ``size``.

    At integer ratios a scale factor gives the same sampling positions as the size and
    exports as a constant, batch-independent Resize.
    """
    if size[0] % z.shape[-2] or size[1] % z.shape[-1]:
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    scale = (size[0] // z.shape[-2], size[1] // z.shape[-1])
    return F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)


class GatedFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim * 2.66)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, temb_dim: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = ChannelAttention(dim, heads, temb_dim)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GatedFeedForward(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), temb)
        return x + self.ffn(self.norm2(x))


class Level(nn.Module):
    def __init__(self, dim: int, heads: int, temb_dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, temb_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x


class Downsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.transpose_conv = nn.ConvTranspose2d(dim_in, dim_out, 3, stride=1, padding=1)
        self.conv = nn.Conv2d(dim_out, dim_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.transpose_conv(x))


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Restormer(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        c, n, h0 = config.num_channels, config.num_res_blocks, config.num_heads
        d1, d2, d3, d4 = (m * c for m in LEVEL_MULTIPLIERS)
        temb = 4 * c
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.encoder_level1 = Level(d1, h0, temb, n)
        self.down1_2 = Downsample(d1, d2)
        self.encoder_level2 = Level(d2, 2 * h0, temb, n)
        self.down2_3 = Downsample(d2, d3)
        self.encoder_level3 = Level(d3, 4 * h0, temb, n)
        self.down3_4 = Downsample(d3, d4)
        self.latent = Level(d4, 8 * h0, temb, n)
        self.up4_3 = Upsample(d4)
        self.reduce_chan_level3 = nn.Conv2d(d4, d3, 1, bias=False)
        self.decoder_level3 = Level(d3, 4 * h0, temb, n)
        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, 1, bias=False)
        self.decoder_level2 = Level(d2, 2 * h0, temb, n)
        self.up2_1 = Upsample(d2)
        self.decoder_level1 = Level(d2, h0, temb, n)
        self.refinement = Level(d2, h0, temb, n)
        self.output = nn.Conv2d(d2, config.out_channels, 3, padding=1, bias=False)
        self.time_embedding = TimeEmbedding(c)  # registered last, as in the published state dict

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)
        enc1 = self.encoder_level1(self.patch_embed.proj(x), temb)
        enc2 = self.encoder_level2(self.down1_2(enc1), temb)
        enc3 = self.encoder_level3(self.down2_3(enc2), temb)
        latent = self.latent(self.down3_4(enc3), temb)
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1))
        dec3 = self.decoder_level3(dec3, temb)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(dec2, temb)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1), temb)
        return self.output(self.refinement(dec1, temb))


class DF5TNetwork(nn.Module):
    """The published wrapper: everything lives under the ``restormer.`` prefix."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.restormer = Restormer(config)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.restormer(x, t)


def to_mixed_precision(network: DF5TNetwork) -> DF5TNetwork:
    """Store the network in float16 but keep in float32 what range or accuracy needs.

    The timestep embedding (cos(t*f) in float16 is off by 0.16 at t=999) and its projections,
    the attention temperatures and the norm parameters stay float32; the norms, the L2
    normalisation and the softmax compute in float32 by construction (see their forwards).
    Works in place and returns the network.
    """
    network.half()
    network.restormer.time_embedding.float()
    for module in network.modules():
        if isinstance(module, ChannelAttention):
            module.time_proj.float()
            module.temperature.data = module.temperature.data.float()
        elif isinstance(module, ChannelLayerNorm):
            module.float()
    return network
