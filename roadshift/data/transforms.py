"""Preprocessing of single raw images (albumentations), for the registered model.

Training and evaluation transform whole batches (``roadshift.data.batch_transforms``),
whose eval path is bitwise this one; the registry's pyfunc model resizes and normalises
each raw image it is given here, so serving and evaluation agree.

Horizontal flips are deliberately absent from every augmentation: a mirrored "no left
turn" sign is a different sign, and mirrored text is not a road sign at all.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2


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
