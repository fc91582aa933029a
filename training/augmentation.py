"""Training augmentation, on whole batches on the training device (on a 2-core CPU, per-sample workers would
compete with the forward pass for the cores).

The networks see slices after the service's preprocessing, a per-slice, per-channel z-score: any affine change of
a slice's intensities (brightness, contrast, a scanner's gain) is undone by it and never reaches them. What does
reach them, and differs between scanners and protocols, is non-linear: the intensity curve (gamma), the coil's
smooth bias field, noise, blur and a coarser acquisition grid. `--augmentation scanner` draws those on the slice's
own intensities (min-max scaled, as the 8-bit file's were) and z-scores the result again, which is exactly the
input the preprocessing would make of such an acquisition.
"""

import math

import torch
from torch.nn import functional as F

# --augmentation: `standard` is flip, rotation, scale 5% and the per-channel jitter; `scanner` adds wider scale
# and the acquisition's non-linear intensity variation (scanner_variation).
AUGMENTATIONS = ("standard", "scanner")
SCALE = {"standard": 0.05, "scanner": 0.15}


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator,
    rotate_degrees: float = 15,
    scale: float = 0.05,
    missing_sequences: float = 0.0,
    scanner: bool = False,
    fill_background: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, rotation, scale and per-channel intensity jitter, on a whole batch.

    With `scanner`, each slice then goes through scanner_variation, and with probability `fill_background` through
    filled_background. With probability `missing_sequences` a slice
    also loses its pre-contrast, its post-contrast or both (one of the three, evenly), each replaced by FLAIR:
    what the preprocessing makes of a study without that sequence (9 of the 85 LGG patients; a grayscale FLAIR
    upload), since it z-scores each channel on its own.
    """
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate_degrees)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * 0.1
    images = images * gain.to(images.device) + shift.to(images.device)
    # No draws for the options that are off: runs without them keep their random stream.
    if scanner:
        images = scanner_variation(images, generator)
    if fill_background > 0:
        images = filled_background(images, generator, fill_background)
    if missing_sequences > 0:
        images = drop_sequences(images, generator, missing_sequences)
    return images, masks


# Which channels a slice without some sequences shows as FLAIR: pre-contrast, post-contrast, or both.
MISSING_SEQUENCE_CHOICES = torch.tensor([[True, False, False], [False, False, True], [True, False, True]])


def drop_sequences(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Replace pre- and/or post-contrast by FLAIR (channel 1) on a random `probability` share of the slices."""
    n = images.shape[0]
    dropped = torch.rand(n, generator=generator) < probability
    choice = torch.randint(len(MISSING_SEQUENCE_CHOICES), (n,), generator=generator)
    replaced = (MISSING_SEQUENCE_CHOICES[choice] & dropped[:, None]).to(images.device)[:, :, None, None]
    return torch.where(replaced, images[:, 1:2], images)


# A pixel is outside the head where every channel, min-max scaled, is below this (the LGG slices' background is
# 0-2 of 255, tissue from ~30).
BACKGROUND_LEVEL = 0.08
FILLED_CHANNELS = torch.tensor([0, 2])  # pre- and post-contrast
FILL_QUANTILES = (0.0, 0.8)  # the fill's level among the head's intensities of that channel


def filled_background(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """On a `probability` share of the slices, pre- or post-contrast (evenly) gets the background around the head
    filled with one tissue-level intensity, then that channel is z-scored again.

    Three LGG patients' pre-contrast is like that (TCGA_FG_5962, _7637 and _A4MU: background 61-103 of 255, about
    their head's median, where everyone else's is 0-2): the z-score does not undo it, and a segmenter that never
    saw it missed most of their tumors (Dice 0.27-0.72, docs/cv/separate-missing-encoder fold 2, which holds all
    three out). The masks do not change."""
    n = images.shape[0]
    chosen = torch.rand(n, generator=generator) < probability
    channel = FILLED_CHANNELS[torch.randint(len(FILLED_CHANNELS), (n,), generator=generator)]
    quantile = FILL_QUANTILES[0] + torch.rand(n, generator=generator) * (FILL_QUANTILES[1] - FILL_QUANTILES[0])
    outside_head = min_max_scaled(images).amax(dim=1) < BACKGROUND_LEVEL  # (n, height, width)
    images = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        background = outside_head[i]
        if not background.any() or background.all():
            continue
        plane = images[i, int(channel[i])]
        level = torch.quantile(plane[~background], float(quantile[i]))
        filled = torch.where(background, level, plane)
        images[i, int(channel[i])] = restandardize(filled[None, None], plane[None, None])[0, 0]
    return images


# Each transform: the share of slices it is drawn for, and its range (nnU-Net's intensity augmentations, on the
# slice's intensities scaled to 0..1).
GAMMA = (0.3, (0.7, 1.5))  # per channel: intensity ** gamma, log-uniform
BIAS_FIELD = (0.3, 0.25)  # per channel: x exp(smooth field), the field's std up to 0.25 (about x0.6..x1.6)
BLUR = (0.2, (0.5, 1.0))  # gaussian sigma in pixels at the network's input size
LOW_RESOLUTION = (0.25, (1.0, 2.0))  # acquired on a grid this many times coarser, then resampled
NOISE = (0.15, 0.03)  # gaussian, std up to this share of the intensity range
BIAS_GRID = 4  # the bias field's control points per side: a field smooth across the head


def scanner_variation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A new acquisition of each slice: gamma, bias field, blur, coarser grid and noise, each drawn for a share of
    the slices, on the slice's intensities min-max scaled to 0..1 per channel; then each channel is z-scored again
    (mean and std restored), as the preprocessing z-scores what it is given. The masks do not change."""
    n, channels, height, width = images.shape
    x = min_max_scaled(images)

    def drawn(share: float, shape: tuple[int, ...] = (n,)) -> torch.Tensor:
        return torch.rand(shape, generator=generator) < share

    def uniform(bounds: tuple[float, float], shape: tuple[int, ...]) -> torch.Tensor:
        return bounds[0] + torch.rand(shape, generator=generator) * (bounds[1] - bounds[0])

    share, (low_gamma, high_gamma) = GAMMA
    gamma = torch.exp(uniform((math.log(low_gamma), math.log(high_gamma)), (n, channels, 1, 1)))
    gamma = torch.where(drawn(share, (n, channels, 1, 1)), gamma, torch.ones(()))
    x = x.clamp_min(0) ** gamma.to(x.device)

    share, strength = BIAS_FIELD
    coarse = torch.randn(n, channels, BIAS_GRID, BIAS_GRID, generator=generator)
    coarse = coarse * (torch.rand(n, channels, 1, 1, generator=generator) * strength)
    coarse = coarse * drawn(share, (n, channels, 1, 1))
    field = F.interpolate(coarse.to(x.device), size=(height, width), mode="bicubic", align_corners=True)
    x = x * torch.exp(field)

    share, sigmas = BLUR
    blurred, sigma = drawn(share), uniform(sigmas, (n,))
    for i in torch.nonzero(blurred).flatten().tolist():
        x[i : i + 1] = gaussian_blur(x[i : i + 1], float(sigma[i]))

    share, factors = LOW_RESOLUTION
    coarser, factor = drawn(share), uniform(factors, (n,))
    for i in torch.nonzero(coarser).flatten().tolist():
        size = (max(1, round(height / float(factor[i]))), max(1, round(width / float(factor[i]))))
        small = F.interpolate(x[i : i + 1], size=size, mode="area")
        x[i : i + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)

    share, strength = NOISE
    noise_std = torch.rand(n, 1, 1, 1, generator=generator) * strength * drawn(share, (n, 1, 1, 1))
    x = x + torch.randn(x.shape, generator=generator).to(x.device) * noise_std.to(x.device)

    return restandardize(x, images)


def min_max_scaled(images: torch.Tensor) -> torch.Tensor:
    """Each slice's channels scaled to 0..1, as the 8-bit file's intensities were before the z-score."""
    low = images.amin(dim=(2, 3), keepdim=True)
    return (images - low) / (images.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)


def restandardize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with each channel's mean and std set to those of `like`: the z-score of x, at the preprocessing's
    scale (a flat slice, whose std the preprocessing floors, stays as flat as it was)."""
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    target_mean, target_std = like.mean(dim=(2, 3), keepdim=True), like.std(dim=(2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6) * target_std + target_mean


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of every channel, reflecting at the borders."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
