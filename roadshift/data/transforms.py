"""Augmentation and preprocessing pipelines (albumentations), one factory per use.

Horizontal flips are deliberately absent: a mirrored "no left turn" sign is a
different sign, and mirrored text is not a road sign at all.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from roadshift.config import AugmentSection


def create_eval_transform(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> A.Compose:
    return A.Compose(
        [
            A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ]
    )


def create_train_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: AugmentSection,
    seed: int,
) -> A.Compose:
    """A seeded Compose, so an epoch's augmentations are reproducible run to run."""
    if not augment.enabled:
        return create_eval_transform(image_size, mean, std)
    steps = [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(augment.scale_min, 1.0)),
        A.Rotate(limit=augment.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(
            brightness_limit=augment.brightness_contrast,
            contrast_limit=augment.brightness_contrast,
            p=0.5,
        ),
        A.HueSaturationValue(
            hue_shift_limit=augment.hue_saturation,
            sat_shift_limit=2 * augment.hue_saturation,
            val_shift_limit=augment.hue_saturation,
            p=0.5,
        ),
        A.GaussianBlur(blur_limit=(3, 5), p=augment.blur_probability),
        A.GaussNoise(std_range=(0.02, 0.08), p=augment.noise_probability),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ]
    return A.Compose(steps, seed=seed)
