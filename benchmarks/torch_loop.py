"""The second GPU baseline: DDRM denoising as a competent PyTorch user writes it.

The whole loop in torch tensors on the GPU (no host round trips), the fp16 network on
batches of tiles, the tiles cut with ``unfold`` and blended back with ``fold`` under
smooth windows at every step (so the image evolves as one, as ours does), torch's own
random normals; no CUDA graphs and no custom kernels. Same work as ours: the same tile,
overlap, steps, sigma0 and skip schedule.
"""

from __future__ import annotations

import math

import numpy as np

from df5t_deploy.sampler import CHANNEL_BASIS, GREY_GAIN, Timesteps


def restore_with_torch_loop(network, image: np.ndarray, schedule, tile: int, overlap: int, steps: int,
                            sigma0: float, batch: int = 8, eta: float = 0.85, eta_b: float = 1.0) -> np.ndarray:
    """Denoise a uint8 image [H, W] with ``network`` (x fp16 [B,3,T,T], t [B] -> eps) on CUDA."""
    import torch
    import torch.nn.functional as F

    device = next(network.parameters()).device
    timesteps = Timesteps(schedule, steps)
    basis = torch.tensor(CHANNEL_BASIS, dtype=torch.float32, device=device)
    s = float(GREY_GAIN)
    height, width = image.shape
    stride = tile - overlap
    padded = (max(tile, math.ceil((height - tile) / stride) * stride + tile),
              max(tile, math.ceil((width - tile) / stride) * stride + tile))
    y = torch.from_numpy(image.astype(np.float32) / 255.0 * 2 - 1).to(device)
    ramp = torch.sin(torch.linspace(0.5, tile - 0.5, tile, device=device) / tile * math.pi) ** 2 + 1e-3
    window = torch.outer(ramp, ramp).reshape(1, 1, -1, 1).expand(1, 3, -1, -1).reshape(1, 3 * tile * tile, 1)
    fold_args = dict(output_size=padded, kernel_size=tile, stride=stride)

    def to_basis(v):
        return torch.einsum("ck,khw->chw", basis, v)

    def from_basis(a):
        return torch.einsum("kc,khw->chw", basis, a)

    def blended_eps(x, t: int):
        pad = (0, padded[1] - width, 0, padded[0] - height)
        tiles = F.unfold(F.pad(x[None], pad, mode="reflect"), tile, stride=stride)  # [1, 3 T T, L]
        count = tiles.shape[-1]
        tiles = tiles.transpose(1, 2).reshape(count, 3, tile, tile)
        eps = torch.empty_like(tiles)
        for start in range(0, count, batch):
            chunk = tiles[start : start + batch].half().contiguous(memory_format=torch.channels_last)
            eps[start : start + batch] = network(chunk, torch.full((len(chunk),), float(t), device=device)).float()
        eps = eps.reshape(1, count, -1).transpose(1, 2)
        summed = F.fold(eps * window, **fold_args) / F.fold(window.expand(-1, -1, count), **fold_args)
        return summed[0, :, :height, :width]

    with torch.inference_mode():
        sig = timesteps.init_sigma
        z = torch.randn(3, height, width, device=device)
        a = z * sig
        if s * sig > sigma0:
            a[0] = y / s + math.sqrt(sig**2 - sigma0**2 / s**2) * z[0]
        x = from_basis(a) / sig
        for plan in timesteps:
            eps = blended_eps(x, plan.t)
            x0 = (x - math.sqrt(1 - plan.alpha_bar) * eps) / math.sqrt(plan.alpha_bar)
            sn = math.sqrt((1 - plan.alpha_bar_next) / plan.alpha_bar_next)
            a0, ae, az = to_basis(x0), to_basis(eps), to_basis(torch.randn(3, height, width, device=device))
            c_dir = math.sqrt(sn**2 - (eta * sn) ** 2)
            v = a0 + c_dir * ae + eta * sn * az
            if s * sn > sigma0:
                v[0] = eta_b * y / s + (1 - eta_b) * a0[0] + math.sqrt(max(sn**2 - sigma0**2 * eta_b**2 / s**2, 0.0)) * az[0]
            else:
                v[0] = a0[0] + c_dir * (y - s * a0[0]) / sigma0 + eta * sn * az[0]
            x = math.sqrt(plan.alpha_bar_next) * from_basis(v)
        grey = ((x + 1) / 2).clamp(0, 1).mean(0)
        return (grey * 255).round().byte().cpu().numpy()
