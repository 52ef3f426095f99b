"""X-DER's consistency term: the SimCLR-style strong augmentation it draws views with and the
supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020) it
applies to the future heads' outputs.

The augmentation is Mammoth's `strong_aug` (horizontal flip; RandomResizedCrop with scale (0.2, 1)
and aspect ratio (3/4, 4/3); ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8; grayscale with
probability 0.2; normalisation), computed on the whole batch on its device instead of image by image
through PIL. Two simplifications: a crop whose sampled size exceeds the image is clipped to the image
(torchvision re-draws up to ten times, then falls back to a central crop), and the four colour
operations run in one random order per batch (torchvision: per image).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY = (0.299, 0.587, 0.114)


def _uniform(low: float, high: float, n: int, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luminance of RGB images (the image itself when it has one channel)."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    weights = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def random_resized_crop(x: torch.Tensor, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Each image: a random crop of a `scale` fraction of its area and a `ratio` aspect ratio, resized
    back to the full size (bilinear)."""
    n, _, height, width = x.shape
    area = _uniform(*scale, n, x.device) * height * width
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), n, x.device))
    w = torch.sqrt(area * aspect).round().clamp(1, width)
    h = torch.sqrt(area / aspect).round().clamp(1, height)
    x0 = torch.floor(torch.rand(n, device=x.device) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, device=x.device) * (height - h + 1))
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w / width, (2 * x0 + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    flat = maxc == minc
    ones = torch.ones_like(maxc)
    chroma = maxc - minc
    s = chroma / torch.where(flat, ones, maxc)
    divisor = torch.where(flat, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack((torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.long() % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, sector[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def color_jitter(x: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8) -> torch.Tensor:
    """torchvision's ColorJitter on a random `p` fraction of the images, with per-image factors."""
    n, device = len(x), x.device
    applied = torch.rand(n, device=device) < p

    def factor(low: float, high: float, identity: float) -> torch.Tensor:
        return torch.where(applied, _uniform(low, high, n, device), torch.full((n,), identity, device=device))

    factors = {"brightness": factor(1 - brightness, 1 + brightness, 1.0),
               "contrast": factor(1 - contrast, 1 + contrast, 1.0),
               "saturation": factor(1 - saturation, 1 + saturation, 1.0),
               "hue": factor(-hue, hue, 0.0)}
    for name in [list(factors)[i] for i in torch.randperm(4).tolist()]:
        f = factors[name].view(n, 1, 1, 1)
        if name == "brightness":
            x = (x * f).clamp(0, 1)
        elif name == "contrast":
            mean = _grayscale(x).mean((1, 2, 3), keepdim=True)
            x = (f * x + (1 - f) * mean).clamp(0, 1)
        elif x.shape[1] == 3 and name == "saturation":
            x = (f * x + (1 - f) * _grayscale(x)).clamp(0, 1)
        elif x.shape[1] == 3 and name == "hue":
            hsv = _rgb_to_hsv(x)
            hsv = torch.stack((torch.remainder(hsv[:, 0] + f.view(n, 1, 1), 1.0), hsv[:, 1], hsv[:, 2]), 1)
            x = _hsv_to_rgb(hsv)
    return x


def strong_augment(images: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
                   ) -> torch.Tensor:
    """X-DER's views of uint8 images [B, C, H, W]: flip, resized crop, colour jitter, grayscale, normalised."""
    x = images.float() / 255.0
    flip = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = color_jitter(random_resized_crop(x))
    if x.shape[1] == 3:
        gray = torch.rand(len(x), device=x.device) < 0.2
        x = torch.where(gray[:, None, None, None], _grayscale(x).expand_as(x), x)
    if mean is not None:
        channels = (1, -1, 1, 1)
        x = (x - torch.tensor(mean, device=x.device).view(channels)) / torch.tensor(std, device=x.device).view(channels)
    return x


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of SupContrast (contrast mode 'all', base temperature = temperature),
    summed over the examples: features [N, views, D] (L2-normalised), labels [N]. Every anchor has
    the other views of its own example as positives, so at least two views are needed."""
    n, views, _ = features.shape
    contrast = torch.cat(features.unbind(1))  # [views · N, D], view-major as torch.cat(torch.unbind(f, 1))
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    same = (labels[:, None] == labels[None, :]).to(logits.dtype).repeat(views, views)
    not_self = 1.0 - torch.eye(n * views, device=logits.device, dtype=logits.dtype)
    positives = same * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob = (positives * log_prob).sum(1) / positives.sum(1)
    return (-mean_log_prob).view(views, n).mean(0).sum()
