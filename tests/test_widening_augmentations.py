"""Widening augmentations: colours and backgrounds a source never shows (tint, inversion,
grayscale, difference-blended textures), for pretraining a model a target can reach."""

from __future__ import annotations

import torch

from roadshift.config import AugmentSection
from roadshift.data.batch_transforms import create_batch_transform
from tests.helpers import AUGMENT_BASICS_OFF

SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def grey_digits(count: int = 6) -> torch.Tensor:
    """White strokes on black, grey as RGB: the shape of a scanned-digit source."""
    images = torch.zeros((count, SIZE, SIZE, 3), dtype=torch.uint8)
    for index in range(count):
        images[index, 3:13, 4 + index % 4 : 7 + index % 4] = 255
    return images


def pixels(augment: AugmentSection, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The view in 0..1."""
    transform = create_batch_transform(SIZE, MEAN, STD, augment)
    out = transform(images, torch.Generator().manual_seed(seed))
    return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def only(**values: float) -> AugmentSection:
    return AugmentSection(**AUGMENT_BASICS_OFF, **values)


def test_widening_is_off_by_default_and_leaves_the_other_augmentations_draws_as_they_were():
    images = grey_digits()
    default = AugmentSection()
    assert (default.tint_probability, default.invert_probability) == (0.0, 0.0)
    assert (default.grayscale_probability, default.texture_blend_probability) == (0.0, 0.0)
    explicit = AugmentSection(
        tint_probability=0.0,
        invert_probability=0.0,
        grayscale_probability=0.0,
        texture_blend_probability=0.0,
    )
    assert torch.equal(pixels(default, images, 5), pixels(explicit, images, 5))


def test_tint_turns_grey_images_into_coloured_ones():
    images = grey_digits()
    tinted = pixels(only(tint_probability=1.0), images)
    channel_spread = (tinted.amax(dim=1) - tinted.amin(dim=1)).amax(dim=(1, 2))
    assert (channel_spread > 0.02).all()  # every image: its channels now differ
    assert pixels(only(), images).amax(dim=1).equal(pixels(only(), images).amin(dim=1))


def test_inversion_swaps_ink_and_background():
    images = grey_digits()
    torch.testing.assert_close(
        pixels(only(invert_probability=1.0), images),
        1.0 - pixels(only(), images),
        atol=1e-5,
        rtol=0,
    )


def test_texture_blend_puts_the_strokes_on_a_coloured_smooth_background_and_keeps_them_visible():
    images = grey_digits()
    blended = pixels(only(texture_blend_probability=1.0), images, seed=1)
    ink = images[..., 0].bool().unsqueeze(1).expand_as(blended)
    background, strokes = blended[~ink].view(6, -1), blended[ink].view(6, -1)
    assert (background.mean(dim=1) > 0.1).all()  # no longer black
    # |x - t|: ink (1) becomes 1 - t where the background shows t, so the digit stays visible
    assert ((strokes.mean(dim=1) - background.mean(dim=1)).abs() > 0.0).all()
    assert not torch.equal(blended, pixels(only(texture_blend_probability=1.0), images, seed=2))
    assert torch.equal(blended, pixels(only(texture_blend_probability=1.0), images, seed=1))


def test_a_probability_applies_to_about_that_share_of_the_images():
    images = grey_digits(200)
    plain = pixels(only(), images)
    inverted = pixels(only(invert_probability=0.3), images)
    changed = (inverted - plain).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.15 < changed.float().mean().item() < 0.45
