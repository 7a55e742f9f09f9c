"""A real source -> target image pair, built offline from data shipped inside scikit-learn.

    .venv/bin/python bench/real_pair.py OUT_DIR [--labels-per-class K] [--seed S] [--image-size N]

Why: the transfer benchmark must be measured on real images, not on the project's own
synthetic road signs, and it must run with no download. scikit-learn ships, inside the
installed package, 1797 real 8x8 scans of handwritten digits (``load_digits``, 10 classes)
and two real photographs (``load_sample_images``: china.jpg, flower.jpg). From them this
builds an MNIST -> MNIST-M style pair, the shape of an outside reviewer's pair (10 classes,
32 px; the source ~900 scans; the target the same kind of objects on real photographic
backgrounds, ~45 labelled train and ~45 test images per class):

* the digits are split per class, from the seed, into a target part (90 per class) and a
  source part (the other ~897): no target digit is ever seen in the source;
* source: each scan upscaled (bicubic) and centred at 3/4 of the image side, as MNIST's
  digits sit inside their frame, white ink on black, saved as grey-as-RGB; split per class
  70/15/15 into ``train``/``val``/``test``;
* target: each digit binarised at half intensity and difference-blended into a random
  crop of one of the two photographs, the published MNIST-M recipe (Ganin et al. 2016):
  ``pixel = |background - digit * 255|`` per channel, so the digit shows as the crop's
  colours inverted; 45 per class in ``train`` and 45 in ``test``. No ``val``: roadshift's
  validate stage requires only ``train`` and ``test`` (``validate.require_splits``; the target
  test split is always required), and a labelled val split would spend the scarce labels;
* ``labels_per_class=K`` keeps only the first K target train images of each class (the same
  seeded order for every K, so budgets are nested and images byte-identical across K); the
  other ``45 - K`` go, without their class, to ``unlabeled/`` for the unlabelled-target
  feature. Their true classes are written to ``unlabeled_labels.csv`` beside it (outside the
  image folder) so a benchmark can score pseudo-labels; the files are numbered in a seeded
  random order, since ``load_digits`` is stored nearly in 0..9 cycles and its index would
  give the class away.

Layout under OUT_DIR (class folders "0".."9"; names are ``<class>/<digit index>.png``)::

    source/{train,val,test}/<class>/<index>.png
    target/{train,test}/<class>/<index>.png
    unlabeled/<n>.png                      (only when K < 45)
    unlabeled_labels.csv                   (file,label,index; only with unlabeled/)

Point ``data.source.path`` / ``data.target.path`` at ``OUT_DIR/source`` / ``OUT_DIR/target``.
With few labels the target test split holds most target images (K=5: 90%). The validate
bounds in force when this was written (``validate.split_fractions.test.max`` 0.97) accept
K >= 3; K < 3 fails ``validate.min_images_per_class`` (3), and the earlier 0.8 test bound
refused K <= 11.
Everything is deterministic from the seed (same seed: byte-identical PNGs).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

NUM_CLASSES = 10
TARGET_TRAIN_PER_CLASS = 45
TARGET_TEST_PER_CLASS = 45
SOURCE_FRACTIONS = {"train": 0.70, "val": 0.15}  # test: the rest
DIGIT_SCALE = 0.75  # digit box side / image side (MNIST: 20 px digits in 28 px frames)
BINARY_THRESHOLD = 128  # MNIST-M binarises the digit before blending
MIN_IMAGE_SIZE = 8
COUNT_KEYS = (
    "source_train",
    "source_val",
    "source_test",
    "target_train",
    "target_val",
    "target_test",
    "unlabeled",
)


def class_name(label: int) -> str:
    """Class folder name: the digit itself ("0".."9"; sorts the same as text and as numbers)."""
    return str(label)


def render_digit(scan: np.ndarray, image_size: int) -> np.ndarray:
    """An 8x8 scan (0..16, ink high) as an ``image_size`` square uint8 grey image, ink white,
    the digit upscaled (bicubic) to ``DIGIT_SCALE`` of the side and centred on black."""
    grey = np.rint(np.clip(scan, 0, 16) * (255 / 16)).astype(np.uint8)
    side = max(1, round(image_size * DIGIT_SCALE))
    digit = Image.fromarray(grey, "L").resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (image_size, image_size), 0)
    offset = (image_size - side) // 2
    canvas.paste(digit, (offset, offset))
    return np.asarray(canvas)


def blend_mnistm(digit: np.ndarray, background: np.ndarray) -> np.ndarray:
    """MNIST-M: ``|background - binarised digit * 255|`` per channel, as uint8 RGB."""
    mask = (digit >= BINARY_THRESHOLD).astype(np.int16) * 255
    return np.abs(background.astype(np.int16) - mask[..., None]).astype(np.uint8)


def random_crop(photos: list[np.ndarray], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``image_size`` square crop of a randomly chosen photograph."""
    photo = photos[int(rng.integers(len(photos)))]
    top = int(rng.integers(photo.shape[0] - image_size + 1))
    left = int(rng.integers(photo.shape[1] - image_size + 1))
    return photo[top : top + image_size, left : left + image_size]


def split_digits(
    labels: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per class: the first 90 of a seeded permutation go to the target (45 train, 45 test),
    the rest to the source, split 70/15/15. Returns (source, target) split -> digit indices."""
    source: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    target: dict[str, list[int]] = {"train": [], "test": []}
    target_per_class = TARGET_TRAIN_PER_CLASS + TARGET_TEST_PER_CLASS
    for label in range(NUM_CLASSES):
        order = rng.permutation(np.flatnonzero(labels == label)).tolist()
        if len(order) <= target_per_class:
            raise ValueError(f"class {label} has {len(order)} digits; need > {target_per_class}")
        target["train"] += order[:TARGET_TRAIN_PER_CLASS]
        target["test"] += order[TARGET_TRAIN_PER_CLASS:target_per_class]
        rest = order[target_per_class:]
        n_train = round(len(rest) * SOURCE_FRACTIONS["train"])
        n_val = round(len(rest) * SOURCE_FRACTIONS["val"])
        source["train"] += rest[:n_train]
        source["val"] += rest[n_train : n_train + n_val]
        source["test"] += rest[n_train + n_val :]
    return source, target


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="PNG")


def build_digits_pair(
    out_dir: Path,
    *,
    seed: int = 0,
    labels_per_class: int | None = None,
    image_size: int = 32,
) -> dict[str, int]:
    """Write the scikit-learn digits -> digits-on-photographs pair under ``out_dir``.

    ``out_dir`` must be missing or empty (nothing is overwritten or deleted). Returns image
    counts: ``source_train``, ``source_val``, ``source_test``, ``target_train``,
    ``target_val`` (always 0), ``target_test`` and ``unlabeled``.
    """
    out_dir = Path(out_dir)
    if labels_per_class is not None and not 1 <= labels_per_class <= TARGET_TRAIN_PER_CLASS:
        raise ValueError(
            f"labels_per_class must be between 1 and {TARGET_TRAIN_PER_CLASS}, "
            f"got {labels_per_class}"
        )
    photos = [np.asarray(p) for p in load_sample_images().images]
    largest = min(min(p.shape[:2]) for p in photos)
    if not MIN_IMAGE_SIZE <= image_size <= largest:
        raise ValueError(f"image_size must be between {MIN_IMAGE_SIZE} and {largest} px")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder; remove it first")

    digits = load_digits()
    labels = np.asarray(digits.target)
    split_rng, crop_rng, pool_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    source, target = split_digits(labels, split_rng)
    counts = dict.fromkeys(COUNT_KEYS, 0)

    for split, indices in source.items():
        for index in indices:
            grey = render_digit(digits.images[index], image_size)
            path = out_dir / "source" / split / class_name(labels[index]) / f"{index}.png"
            _save(np.repeat(grey[..., None], 3, axis=2), path)
        counts[f"source_{split}"] = len(indices)

    # Crops are drawn in one fixed order (test, then train) whatever the label budget, so a
    # seed gives byte-identical target images for every K.
    blended = {
        index: blend_mnistm(
            render_digit(digits.images[index], image_size),
            random_crop(photos, image_size, crop_rng),
        )
        for index in target["test"] + target["train"]
    }
    for index in target["test"]:
        _save(
            blended[index], out_dir / "target" / "test" / class_name(labels[index]) / f"{index}.png"
        )
    counts["target_test"] = len(target["test"])

    keep = TARGET_TRAIN_PER_CLASS if labels_per_class is None else labels_per_class
    labelled, pool = [], []
    for label in range(NUM_CLASSES):
        of_class = [i for i in target["train"] if labels[i] == label]
        labelled += of_class[:keep]
        pool += of_class[keep:]
    for index in labelled:
        path = out_dir / "target" / "train" / class_name(labels[index]) / f"{index}.png"
        _save(blended[index], path)
    counts["target_train"] = len(labelled)

    if pool:
        rows = []
        for number, index in enumerate(pool_rng.permutation(pool).tolist()):
            name = f"{number:04d}.png"
            _save(blended[index], out_dir / "unlabeled" / name)
            rows.append((name, class_name(labels[index]), index))
        with (out_dir / "unlabeled_labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("file", "label", "index"))
            writer.writerows(rows)
    counts["unlabeled"] = len(pool)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the scikit-learn digits -> digits-on-photographs (MNIST-M style) pair."
    )
    parser.add_argument("out_dir", type=Path, help="missing or empty folder to write into")
    parser.add_argument(
        "--labels-per-class",
        type=int,
        default=None,
        metavar="K",
        help=f"labelled target train images per class (1-{TARGET_TRAIN_PER_CLASS}); "
        "the others go to unlabeled/ (default: all labelled)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        counts = build_digits_pair(
            args.out_dir,
            seed=args.seed,
            labels_per_class=args.labels_per_class,
            image_size=args.image_size,
        )
    except (ValueError, FileExistsError) as error:
        print(f"real_pair: {error}", file=sys.stderr)
        return 2
    print(" ".join(f"{key}={value}" for key, value in counts.items()))
    print(f"source: {args.out_dir / 'source'}  target: {args.out_dir / 'target'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
