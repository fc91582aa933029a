"""Training augmentation: geometry moves image and mask together, missing sequences become FLAIR as the
preprocessing makes them, the scanner variation is a new acquisition after the preprocessing's z-score, and a
filled background is what the preprocessing makes of a T1 series padded with a tissue-level intensity."""

import torch

from app.core.preprocessing import preprocess_slice
from training.augmentation import augment_batch, filled_background, gaussian_blur, scanner_variation


def blob_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every channel is their mask: a centered blob, so geometry can be checked after jitter."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    masks = ((((y - 0.1) / 0.4) ** 2 + ((x + 0.2) / 0.25) ** 2) <= 1).float().expand(n, 1, 32, 32).clone()
    return masks.expand(n, 3, 32, 32).clone(), masks


def test_augment_keeps_shapes_and_mask_range_and_is_reproducible() -> None:
    images, masks = blob_batch()
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert out_masks.min() >= 0 and out_masks.max() <= 1
    again_images, again_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(out_images, again_images) and torch.equal(out_masks, again_masks)
    other_images, _ = augment_batch(images, masks, torch.Generator().manual_seed(1))
    assert not torch.equal(out_images, other_images)


def test_augment_moves_image_and_mask_together() -> None:
    images, masks = blob_batch()
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(3))
    assert not torch.allclose(out_masks, masks)  # something moved
    # Each channel is gain * mask + shift after the same warp: perfectly correlated with the warped mask.
    for image, mask in zip(out_images, out_masks, strict=True):
        for channel in image:
            correlation = torch.corrcoef(torch.stack([channel.flatten(), mask.flatten()]))[0, 1]
            assert correlation > 0.999


def test_augment_without_rotation_and_scale_only_flips() -> None:
    images, masks = blob_batch()
    _, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0), rotate_degrees=0, scale=0)
    flipped = [torch.allclose(m, masks[0].flip(-1), atol=1e-5) for m in out_masks]
    unchanged = [torch.allclose(m, masks[0], atol=1e-5) for m in out_masks]
    assert all(f or u for f, u in zip(flipped, unchanged, strict=True))
    assert any(flipped) and any(unchanged)


def test_missing_sequences_become_flair_as_preprocessing_makes_them() -> None:
    """A dropped sequence is FLAIR exactly (what preprocess_slice gives a FLAIR-only slice); the rest is untouched."""
    images, masks = blob_batch(256)
    images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(5))  # channels now differ
    kept_images, kept_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0), missing_sequences=0.5)
    assert torch.equal(out_masks, kept_masks) and torch.equal(out_images[:, 1], kept_images[:, 1])
    as_flair = (out_images == out_images[:, 1:2]).flatten(2).all(-1)  # (n, 3): channel equals FLAIR
    untouched = (out_images == kept_images).flatten(2).all(-1)
    assert (as_flair | untouched).all()
    pre_only, post_only, both = (
        (as_flair[:, 0] & ~as_flair[:, 2]).sum(),
        (~as_flair[:, 0] & as_flair[:, 2]).sum(),
        as_flair[:, [0, 2]].all(-1).sum(),
    )
    assert 70 <= pre_only + post_only + both <= 186  # about half of 256
    assert min(pre_only, post_only, both) >= 20  # each of the three cases is drawn


def test_augment_draws_nothing_extra_without_missing_sequences() -> None:
    """Runs from before the option (and resumed ones) keep their random stream."""
    images, masks = blob_batch()
    generator = torch.Generator().manual_seed(0)
    augment_batch(images, masks, generator, missing_sequences=0.0)
    reference = torch.Generator().manual_seed(0)
    augment_batch(images, masks, reference)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))


def preprocessed_batch(n: int = 32, size: int = 32) -> torch.Tensor:
    """Slices as the preprocessing gives them: a bright blob on a darker head on black, z-scored per channel."""
    generator = torch.Generator().manual_seed(7)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = (y**2 + x**2 <= 0.8).float() * 90
    blob = ((y - 0.2) ** 2 + (x + 0.1) ** 2 <= 0.1).float() * 120
    raw = (head + blob).expand(n, 3, size, size) + torch.rand(n, 3, size, size, generator=generator) * 20
    slices = [preprocess_slice(r.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(), size) for r in raw]
    return torch.stack([torch.from_numpy(s) for s in slices])


def test_scanner_variation_is_a_new_acquisition_z_scored_again() -> None:
    images = preprocessed_batch()
    out = scanner_variation(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.isfinite(out).all()
    # Each channel is z-scored again, as the preprocessing would z-score that acquisition.
    torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), images.std(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    # Non-linear on some slices (an affine change would leave the z-scored channel exactly as it was), not all.
    correlation = torch.stack(
        [torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] for a, b in zip(out, images, strict=True)]
    )
    assert (correlation < 0.999).sum() >= 8 and (correlation > 0.9999).sum() >= 1
    assert correlation.min() > 0.5  # the anatomy is still there
    again = scanner_variation(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_scanner_augmentation_changes_intensities_never_the_masks() -> None:
    images, masks = blob_batch()
    images = preprocessed_batch(len(images))
    plain_images, plain_masks = augment_batch(images, masks, torch.Generator().manual_seed(0), scale=0.15)
    scanner_images, scanner_masks = augment_batch(
        images, masks, torch.Generator().manual_seed(0), scale=0.15, scanner=True
    )
    assert torch.equal(plain_masks, scanner_masks)
    assert not torch.allclose(plain_images, scanner_images)


def test_augment_draws_nothing_extra_without_the_scanner_variation() -> None:
    images, masks = blob_batch()
    generator = torch.Generator().manual_seed(0)
    augment_batch(images, masks, generator, scanner=False)
    reference = torch.Generator().manual_seed(0)
    augment_batch(images, masks, reference)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))


def test_filled_background_is_one_t1_channel_padded_at_a_tissue_level_z_scored_again() -> None:
    size, generator = 32, torch.Generator().manual_seed(7)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = y**2 + x**2 <= 0.8
    raw = (head * (60 + 100 * (y + 1) / 2)).expand(64, 3, size, size) + torch.rand(
        64, 3, size, size, generator=generator
    ) * 8
    images = torch.stack(
        [torch.from_numpy(preprocess_slice(r.permute(1, 2, 0).round().to(torch.uint8).numpy(), size)) for r in raw]
    )
    out = filled_background(images, torch.Generator().manual_seed(0), 1.0)
    changed = ~(out == images).flatten(2).all(-1)  # (n, 3)
    assert changed.sum(1).eq(1).all() and not changed[:, 1].any()  # one of pre- and post-contrast, FLAIR never
    assert 16 <= changed[:, 0].sum() <= 48  # both drawn, about evenly
    torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), images.std(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    levels = []
    for i, channel in torch.nonzero(changed).tolist():
        filled = out[i, channel]
        assert filled[~head].unique().numel() == 1  # one intensity all around the head
        level = filled[~head][0]
        assert filled[head].min() <= level <= filled[head].quantile(0.8) + 1e-5  # a tissue level, not black
        levels.append(((level - filled[head].min()) / (filled[head].max() - filled[head].min())).item())
        # The head keeps its intensities up to the z-score's affine change.
        correlation = torch.corrcoef(torch.stack([filled[head], images[i, channel][head]]))[0, 1]
        assert correlation > 0.9999
    assert max(levels) - min(levels) > 0.4  # levels drawn across the head's range


def test_filled_background_draws_its_share_and_leaves_masks_alone() -> None:
    images, masks = blob_batch(200)
    images = preprocessed_batch(200)
    plain_images, plain_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0), fill_background=0.3)
    assert torch.equal(out_masks, plain_masks)
    filled = ~(out_images == plain_images).flatten(1).all(-1)
    assert 35 <= filled.sum() <= 85  # about 30% of 200
    generator, reference = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    augment_batch(images, masks, generator, fill_background=0.0)  # off: no draws, the random stream is kept
    augment_batch(images, masks, reference)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))


def test_gaussian_blur_keeps_flat_images_flat_and_the_total() -> None:
    flat = torch.full((1, 3, 16, 16), 2.5)
    torch.testing.assert_close(gaussian_blur(flat, 0.8), flat)
    point = torch.zeros(1, 1, 17, 17)
    point[0, 0, 8, 8] = 1
    blurred = gaussian_blur(point, 1.0)
    assert abs(blurred.sum().item() - 1) < 1e-5 and blurred[0, 0, 8, 8] < 0.2
    assert torch.allclose(blurred, blurred.flip(-1)) and torch.allclose(blurred, blurred.transpose(-1, -2))
