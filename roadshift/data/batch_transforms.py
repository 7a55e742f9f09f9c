"""Preprocessing and augmentation of whole uint8 batches, as a few vectorised torch ops.

Per-image albumentations pipelines cost more than the model's own training step on a
small CPU machine (profiled: about 0.3 ms per 64 px image, a third of the step), so the
training loaders take decoded uint8 batches (``roadshift.data.decoded``) and augment
them here in one go. Every random draw of a batch comes from one ``torch.Generator``
seeded with the batch's seed (``roadshift.train.loaders``), so augmentations stay a pure
function of ``(seed, epoch, batch)``: the same with any worker count or resume point.

The augmentations keep the meaning of ``params.yaml``'s ``augment`` section:

* random resized crop (area ``scale_min``..1, aspect 3/4..4/3) and, with probability
  0.5, a rotation within ``rotate_limit`` degrees, sampled together as one affine
  warp with reflected borders (one ``grid_sample`` instead of two resamplings);
* with probability 0.5 each: brightness and contrast (``brightness_contrast``, as
  albumentations: ``x * (1 + c) + b``), and hue/saturation/value (``hue_saturation =
  h``: hue rotated by up to +-2h degrees, which is albumentations' +-h in OpenCV's
  180-per-turn units; saturation scaled by up to +-2h/255, what albumentations adds to
  a fully saturated pixel; value shifted by up to +-h of
  255). Hue and saturation are linear maps here (rotation about the grey axis, the
  SVG/CSS hue-rotate filter, and a lerp from luma) rather than a round trip through
  HSV: all colour changes of a batch then fold into one matmul, at a fifth of the cost;
* Gaussian blur (kernel 3 or 5) with ``blur_probability`` and Gaussian noise (std
  2-8 % of the range) with ``noise_probability``.

``StrongBatchTransform`` is self-training's strong view: the same steps at a
``StrongAugmentSection``'s wider ranges, plus inversion, grayscale and a cutout square.

Horizontal flips stay absent (see ``roadshift.data.transforms``). Evaluation needs no
randomness: ``EvalBatchTransform`` normalises through the same per-channel lookup table
albumentations' ``Normalize`` uses, so its tensors are bitwise those of
``create_eval_transform`` (which the registered model still uses on raw images).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from roadshift.config import AugmentSection, StrongAugmentSection


def normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(3, 256) float32: albucore's ``normalize_lut`` table, computed the same way."""
    mean_np = np.array(mean, dtype=np.float32) * 255.0
    denominator = np.reciprocal(np.array(std, dtype=np.float32) * 255.0)
    values = np.arange(256, dtype=np.float32)
    table = (values - mean_np.reshape(-1, 1)) * denominator.reshape(-1, 1)
    return torch.from_numpy(table.astype(np.float32))


class EvalBatchTransform:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W), channels_last in memory."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._table = normalisation_table(mean, std).flatten()
        self._offsets = torch.arange(3, dtype=torch.int64) * 256

    def normalise_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Table lookup per channel; the NHWC->NCHW permute is a view, so the result is
        channels_last, the layout the CPU and GPU convolutions here run fastest on."""
        index = images.to(torch.int64) + self._offsets
        return self._table[index].permute(0, 3, 1, 2)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.normalise_uint8(images)


class TrainBatchTransform(EvalBatchTransform):
    """The seeded train augmentations of one batch (see the module docstring)."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: AugmentSection,
    ) -> None:
        super().__init__(image_size, mean, std)
        self.augment = augment
        self._base_grid = _base_grid(image_size)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = self._augment(x, generator)
        return x.clamp_(0.0, 1.0).sub_(self.mean).div_(self.std)

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Float images in [0, 1] through every step, in order. A widening step whose
        probability is 0 draws nothing, so turning none on leaves the random stream of the
        others as it was."""
        x = self._crop_and_rotate(x, g)
        x = self._colour(x, g)
        x = self._widen(x, g)
        x = self._blur(x, g)
        return self._noise(x, g)

    # -- geometry -------------------------------------------------------------------------

    def _crop_and_rotate(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Output pixel -> crop centre + diag(w, h) @ R(angle) @ output coordinate."""
        n, aug = len(x), self.augment
        area = _uniform(n, aug.scale_min, 1.0, g)
        log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
        width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        centre_x = _uniform(n, -1.0, 1.0, g) * (1.0 - width)
        centre_y = _uniform(n, -1.0, 1.0, g) * (1.0 - height)
        angle = torch.deg2rad(_uniform(n, -aug.rotate_limit, aug.rotate_limit, g))
        angle = angle * _chosen(n, 0.5, g)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([width * cos, -width * sin, centre_x], dim=1),
                torch.stack([height * sin, height * cos, centre_y], dim=1),
            ],
            dim=1,
        )
        # F.affine_grid's own result (align_corners=False), as one matmul over a cached
        # base grid: 5x cheaper on CPU here
        size = self.image_size
        grid = torch.matmul(self._base_grid, theta.transpose(1, 2)).view(n, size, size, 2)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    # -- colour ---------------------------------------------------------------------------

    def _colour(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Brightness/contrast and hue/saturation/value as one per-image affine colour map
        (a 3x3 matrix and an offset, applied with one batched matmul)."""
        n, aug = len(x), self.augment
        limit, hsv = aug.brightness_contrast, float(aug.hue_saturation)
        applied = _chosen(n, 0.5, g)
        contrast = 1.0 + _uniform(n, -limit, limit, g) * applied
        brightness = _uniform(n, -limit, limit, g) * applied
        applied = _chosen(n, 0.5, g)
        hue = torch.deg2rad(_uniform(n, -2 * hsv, 2 * hsv, g)) * applied  # OpenCV: 2 deg/unit
        saturation = 1.0 + _uniform(n, -2 * hsv, 2 * hsv, g) / 255.0 * applied
        value = _uniform(n, -hsv, hsv, g) / 255.0 * applied
        matrix = contrast.view(n, 1, 1) * _saturation_matrix(saturation) @ _hue_matrix(hue)
        offset = (brightness + value).view(n, 1, 1).expand(n, 3, 1)
        flat = torch.baddbmm(offset, matrix, x.reshape(n, 3, -1))
        return flat.view_as(x).clamp_(0.0, 1.0)

    # -- widening: colours and backgrounds the source never shows ------------------------

    def _widen(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        aug = self.augment
        if aug.tint_probability > 0:
            x = self._tint(x, g)
        if aug.invert_probability > 0 or aug.grayscale_probability > 0:
            x = self._invert_and_grayscale(x, g)
        if aug.texture_blend_probability > 0:
            x = self._texture_blend(x, g)
        return x

    def _tint(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Per image and channel ``x * gain + offset`` (gain 0.3-1, offset 0-0.4): grey
        images become coloured, coloured ones take another colour scheme."""
        n = len(x)
        applied = _chosen(n, self.augment.tint_probability, g).view(n, 1, 1, 1)
        gain = 0.3 + 0.7 * torch.rand((n, 3, 1, 1), generator=g)
        offset = 0.4 * torch.rand((n, 3, 1, 1), generator=g)
        return torch.lerp(x, (x * gain + offset).clamp_(0.0, 1.0), applied)

    def _invert_and_grayscale(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Per image, ``1 - x`` and/or its luma in all three channels, as blends by 0/1
        weights so every image takes the same ops (no gather, no branch)."""
        n, aug = len(x), self.augment
        invert = _chosen(n, aug.invert_probability, g).view(n, 1, 1, 1)
        grey = _chosen(n, aug.grayscale_probability, g).view(n, 1, 1, 1)
        x = x + invert * (1.0 - 2.0 * x)
        luma = (LUMA.view(1, 3, 1, 1) * x).sum(dim=1, keepdim=True)
        return x + grey * (luma - x)

    def _texture_blend(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """``|x - texture|`` per channel, the difference blend MNIST-M puts digits into
        photographs with, against a random smooth colour texture (two octaves of value
        noise, 4x4 and 8x8 cells, bilinearly upsampled): a stand-in for the backgrounds of
        a photographed target that needs no target image."""
        n, size = len(x), x.shape[-1]
        applied = _chosen(n, self.augment.texture_blend_probability, g).view(n, 1, 1, 1)
        texture = torch.zeros_like(x)
        for cells, weight in ((4, 0.65), (8, 0.35)):
            coarse = torch.rand((n, 3, cells, cells), generator=g)
            texture += weight * F.interpolate(
                coarse, size=(size, size), mode="bilinear", align_corners=False
            )
        return torch.lerp(x, (x - texture).abs_(), applied)

    # -- blur and noise -------------------------------------------------------------------

    def _blur(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Separable Gaussian, kernel 3 or 5 and sigma 0.5-3 per image, reflected borders."""
        n = len(x)
        applied = _chosen(n, self.augment.blur_probability, g)
        wide = _chosen(n, 0.5, g)
        sigma = _uniform(n, 0.5, 3.0, g)
        rows = torch.nonzero(applied).flatten()
        if len(rows) == 0:
            return x
        offsets = torch.arange(-2, 3, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma[rows].view(-1, 1)) ** 2)
        kernel = kernel * ((offsets.abs() <= 1) | wide[rows].view(-1, 1).bool())
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)
        k, size = len(rows), x.shape[-1]
        blurred = F.pad(x[rows].reshape(1, k * 3, size, size), (2, 2, 2, 2), mode="reflect")
        blurred = F.conv2d(blurred, kernel.view(k * 3, 1, 1, 5), groups=k * 3)
        blurred = F.conv2d(blurred, kernel.view(k * 3, 1, 5, 1), groups=k * 3)
        x[rows] = blurred.view(k, 3, size, size)  # x is this transform's own intermediate
        return x

    def _noise(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n = len(x)
        applied = _chosen(n, self.augment.noise_probability, g)
        std = _uniform(n, 0.02, 0.08, g)
        rows = torch.nonzero(applied).flatten()
        if len(rows) == 0:
            return x
        noise = torch.randn((len(rows), *x.shape[1:]), generator=g) * std[rows].view(-1, 1, 1, 1)
        x[rows] += noise  # in place: x is this transform's own intermediate
        return x


class StrongBatchTransform(TrainBatchTransform):
    """The strong view of self-training (``roadshift.transfer.self_training``): the train
    augmentations at a ``StrongAugmentSection``'s wider ranges, then inversion, grayscale and
    cutout. Invariance to these is what lets pseudo-labels from a weak view carry across a
    colour or lighting shift the source data never showed; same seeding as the parent."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: StrongAugmentSection,
    ) -> None:
        super().__init__(image_size, mean, std, augment)
        self.strong = augment

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return self._cutout(super()._augment(x, g), g)

    def _cutout(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """One mid-grey square per image, side uniform in 0..``cutout_fraction`` of the
        image's side, centre anywhere (it may hang over an edge), as in FixMatch."""
        n, size = len(x), x.shape[-1]
        half = _uniform(n, 0.0, self.strong.cutout_fraction, g) * size / 2
        centre_y, centre_x = _uniform(n, 0.0, size, g), _uniform(n, 0.0, size, g)
        pixels = torch.arange(size, dtype=torch.float32) + 0.5
        rows = (pixels - centre_y.view(-1, 1)).abs() < half.view(-1, 1)
        columns = (pixels - centre_x.view(-1, 1)).abs() < half.view(-1, 1)
        erased = (rows.unsqueeze(2) & columns.unsqueeze(1)).unsqueeze(1)
        return x.masked_fill_(erased, 0.5)  # x is this transform's own intermediate


def create_strong_batch_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: StrongAugmentSection,
) -> EvalBatchTransform:
    """The strong view of self-training; the eval transform when ``augment`` is disabled."""
    if not augment.enabled:
        return EvalBatchTransform(image_size, mean, std)
    return StrongBatchTransform(image_size, mean, std, augment)


def create_batch_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: AugmentSection | None = None,
) -> EvalBatchTransform:
    """The train transform when ``augment`` is given and enabled, else the eval one."""
    if augment is None or not augment.enabled:
        return EvalBatchTransform(image_size, mean, std)
    return TrainBatchTransform(image_size, mean, std, augment)


def _base_grid(size: int) -> torch.Tensor:
    """(size * size, 3) rows (x, y, 1) of pixel centres in [-1, 1], row-major."""
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(-1, 3)


def _uniform(n: int, low: float, high: float, g: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _chosen(n: int, probability: float, g: torch.Generator | None) -> torch.Tensor:
    """1.0 where an augmentation applies, 0.0 elsewhere; always n draws, so what one
    augmentation decides never shifts the random stream of the next."""
    return (torch.rand(n, generator=g) < probability).to(torch.float32)


LUMA = torch.tensor([0.213, 0.715, 0.072])  # Rec. 709 weights, as the hue-rotate filter


def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotations of RGB about the grey axis: the hue-rotate filter (SVG/CSS),
    a linear stand-in for an HSV hue shift that keeps luma."""
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    luma = LUMA.expand(3, 3)
    identity = torch.eye(3)
    rotate = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
    return luma + cos * (identity - luma) + sin * rotate


def _saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3): each colour moved away from (factor > 1) or towards its luma."""
    luma = LUMA.expand(3, 3)
    return luma + factor.view(-1, 1, 1) * (torch.eye(3) - luma)
