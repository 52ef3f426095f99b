"""Batched augmentation of uint8 image tensors on their own device (no per-sample PIL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _draw(draw, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A random tensor from the global generator on `device`, or from `generator` (a CPU one) moved there."""
    if generator is None:
        return draw(device=device)
    return draw(device="cpu", generator=generator).to(device)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the original size from a zero-padded copy, independently per image."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    shift_y = _draw(lambda **kw: torch.randint(0, 2 * padding + 1, (n, 1), **kw), generator, images.device)
    shift_x = _draw(lambda **kw: torch.randint(0, 2 * padding + 1, (n, 1), **kw), generator, images.device)
    rows = (shift_y + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (shift_x + torch.arange(width, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the images."""
    flip = _draw(lambda **kw: torch.rand(images.shape[0], **kw), generator, images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def to_float(images: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """uint8 [0, 255] → float in [0, 1], then per-channel normalisation when the dataset has one."""
    x = images.float().div_(255.0)
    if mean is not None:
        x = (x - mean) / std
    return x
