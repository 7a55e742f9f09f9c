"""Semi-supervised adaptation (roadshift.transfer.self_training) on a tiny shifted domain.

Three shapes (disc, horizontal bar, vertical bar), 24 px. The source draws them dark red on
light grey; the target is the source with inverted colours and rotated channels (light cyan
on dark). A small CNN with BatchNorm learns the source in a second, and gets the target
barely above chance. Real torch training on the CPU, no mocks; each test takes seconds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from roadshift.config import (
    AugmentSection,
    SelfTrainingSection,
    StrongAugmentSection,
    load_params,
)
from roadshift.data.batch_transforms import create_strong_batch_transform
from roadshift.train.loop import FitOptions, accuracy, fit, make_loader, predict_logits
from roadshift.transfer.self_training import (
    LabelledImages,
    adapt_batchnorm,
    augmented_views,
    self_train,
)
from tests.helpers import AUGMENT_BASICS_OFF, PROJECT_ROOT

CPU = torch.device("cpu")
SIZE = 24
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
VIEWS = augmented_views(
    SIZE, MEAN, STD, AugmentSection(scale_min=0.8, rotate_limit=10), StrongAugmentSection()
)


def shapes(n: int, seed: int, target: bool) -> tuple[np.ndarray, torch.Tensor]:
    """``n`` uint8 (n, 24, 24, 3) images of the three classes in turn, with their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    images = np.empty((n, SIZE, SIZE, 3), np.float32)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(8, 16, 2)
        radius = rng.uniform(4, 7)
        if label == 0:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        elif label == 1:
            shape = (abs(yy - cy) < 2) & (abs(xx - cx) < radius + 2)
        else:
            shape = (abs(xx - cx) < 2) & (abs(yy - cy) < radius + 2)
        background = rng.uniform(170, 230, 3)
        foreground = rng.uniform([120, 10, 10], [200, 60, 60])
        images[i] = np.where(shape[..., None], foreground, background)
        images[i] += rng.normal(0, 10, (SIZE, SIZE, 3))
    images = np.clip(images, 0, 255)
    if target:
        images = (255 - images)[..., [1, 2, 0]]
    return images.astype(np.uint8), torch.from_numpy(labels).long()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)

    def block(inputs: int, outputs: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
        )

    return nn.Sequential(
        block(3, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.MaxPool2d(2),
        block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


class Images(Dataset):
    """uint8 images through a batch transform, seeded per batch like ManifestDataset."""

    returns_batches = True

    def __init__(self, images: np.ndarray, targets: torch.Tensor, transform) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(getattr(batch, "indices", batch))
        seed = getattr(batch, "seed", None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.transform(torch.from_numpy(self.images[rows]), generator), self.targets[rows]


def clean_loader(images: np.ndarray, targets: torch.Tensor):
    return make_loader(Images(images, targets, VIEWS.clean), 128, shuffle=False, seed=0)


def target_accuracy(model: nn.Module, data) -> float:
    return accuracy(*predict_logits(model, clean_loader(*data), CPU))


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and the 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def domains(one_thread) -> dict:
    """The source model and the target data: few labels, unlabelled images, val and test."""
    source = shapes(300, 1, target=False)
    model = small_cnn()
    fit(
        model,
        [{"params": list(model.parameters()), "lr": 3e-3}],
        make_loader(Images(*source, VIEWS.weak), 32, shuffle=True, seed=0),
        None,
        FitOptions(epochs=6, seed=0),
        device=CPU,
    )
    return {
        "source_state": copy.deepcopy(model.state_dict()),
        "source_accuracy": target_accuracy(model, shapes(150, 6, target=False)),
        "labelled": shapes(6, 3, target=True),  # two per class
        "unlabelled": shapes(150, 2, target=True)[0],
        "val": shapes(30, 4, target=True),
        "test": shapes(150, 5, target=True),
    }


def source_model(domains: dict) -> nn.Module:
    model = small_cnn()
    model.load_state_dict(domains["source_state"])
    return model


def run_self_training(domains: dict, cfg: SelfTrainingSection, **kwargs):
    model = source_model(domains)
    result = self_train(
        model,
        LabelledImages(*domains["labelled"]),
        domains["unlabelled"],
        cfg,
        views=VIEWS,
        batch_size=6,
        seed=0,
        device=CPU,
        **kwargs,
    )
    return model, result


# --- the shift, and AdaBN --------------------------------------------------------------------


def test_the_source_model_is_good_on_the_source_and_poor_on_the_target(domains):
    assert domains["source_accuracy"] >= 0.95
    assert target_accuracy(source_model(domains), domains["test"]) <= 0.75  # chance: 1/3


def test_adapt_batchnorm_replaces_only_batchnorm_statistics_with_the_targets(domains):
    model = source_model(domains)
    before = copy.deepcopy(model.state_dict())
    images = domains["unlabelled"]
    assert adapt_batchnorm(model, images, CPU, transform=VIEWS.clean) == len(images)
    after = model.state_dict()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    statistics = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(after[k], before[k]) for k in statistics)
    # the first BatchNorm now holds the mean of the first convolution over the target images
    first_conv, first_bn = model[0][0], model[0][1]
    with torch.no_grad():
        features = first_conv(VIEWS.clean(torch.from_numpy(images)))
    expected = features.mean(dim=(0, 2, 3))
    torch.testing.assert_close(first_bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert all(module.training for module in model.modules())  # modes restored
    # a loader of normalised batches gives the same statistics
    again = source_model(domains)
    # (two batches of 75: the uint8 path splits the 150 images the same way)
    labels = torch.zeros(len(images), dtype=torch.long)
    loader = make_loader(Images(images, labels, VIEWS.clean), 75, shuffle=False, seed=0)
    assert adapt_batchnorm(again, loader, CPU) == len(images)
    for name, value in again.state_dict().items():  # up to the memory layout's rounding
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-5)


# --- self-training ---------------------------------------------------------------------------


def test_self_training_beats_the_source_model_and_training_on_the_few_labels_alone(domains):
    """Two labelled target images a class, 150 unlabelled ones: pseudo-labels on the
    unlabelled images do what two labels a class cannot."""
    source = target_accuracy(source_model(domains), domains["test"])

    labels_only = source_model(domains)
    fit(
        labels_only,
        [{"params": list(labels_only.parameters()), "lr": 1e-3}],
        make_loader(Images(*domains["labelled"], VIEWS.weak), 6, shuffle=True, seed=0),
        None,
        FitOptions(epochs=40, seed=0, schedule="cosine"),
        device=CPU,
    )
    few_labels = target_accuracy(labels_only, domains["test"])

    cfg = SelfTrainingSection(epochs=15, lr=2e-3)
    model, result = run_self_training(domains, cfg)
    self_trained = target_accuracy(model, domains["test"])

    assert self_trained >= source + 0.1, (source, self_trained)
    assert self_trained >= few_labels + 0.1, (few_labels, self_trained)
    assert len(result.history) == 15 and result.best_epoch == 15  # no val: the last epoch
    assert result.steps == 15 * 9  # 150 unlabelled images in batches of 3 x 6
    assert all(0.0 < record["self_train_mask_rate"] <= 1.0 for record in result.history)
    assert result.mask_rate == result.history[-1]["self_train_mask_rate"]


@pytest.mark.parametrize(
    "options",
    [{}, {"ema_decay": 0.99, "distribution_alignment": False, "relative_threshold": False}],
    ids=["student", "ema-teacher"],
)
def test_self_training_is_deterministic_for_a_seed(domains, options):
    cfg = SelfTrainingSection(epochs=2, lr=2e-3, **options)
    first, first_result = run_self_training(domains, cfg)
    second, second_result = run_self_training(domains, cfg)
    assert states_equal(first.state_dict(), second.state_dict())
    assert first_result.history == second_result.history
    assert not states_equal(first.state_dict(), domains["source_state"])


def test_with_val_the_best_epoch_is_kept_and_a_harmful_run_leaves_the_model_as_it_was(domains):
    val = clean_loader(*domains["val"])
    seen: list[int] = []
    cfg = SelfTrainingSection(epochs=3, lr=5.0)  # far too high: every epoch is worse
    model, result = run_self_training(
        domains, cfg, val=val, on_epoch_end=lambda record, epoch: seen.append(epoch)
    )
    assert seen == [1, 2, 3]
    assert all("val_accuracy" in record for record in result.history)
    assert result.best_epoch == 0
    assert result.best_val_accuracy == result.start_val_accuracy
    assert states_equal(model.state_dict(), domains["source_state"])


def test_self_training_trains_only_what_requires_grad(domains):
    model = source_model(domains)
    model[:-1].requires_grad_(False)  # the head alone
    self_train(
        model,
        LabelledImages(*domains["labelled"]),
        domains["unlabelled"][:30],
        SelfTrainingSection(epochs=1),
        views=VIEWS,
        batch_size=6,
        seed=0,
        device=CPU,
    )
    for name, parameter in model.named_parameters():
        same = torch.equal(parameter, domains["source_state"][name])
        assert same == (not name.startswith("7.")), name  # 7: the final nn.Linear


# --- the strong view and the config ------------------------------------------------------------


def only(**values) -> StrongAugmentSection:
    """A strong augmentation with everything off but ``values``."""
    off = dict(
        **AUGMENT_BASICS_OFF,
        invert_probability=0.0,
        grayscale_probability=0.0,
        cutout_fraction=0.0,
    )
    return StrongAugmentSection(**{**off, **values})


def test_strong_view_inverts_greys_and_cuts_out_as_configured():
    images = torch.from_numpy(shapes(4, 0, target=False)[0])
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def pixels(transform, seed: int) -> torch.Tensor:
        """The view in 0..1; every view takes the same random draws whatever it applies."""
        return transform(images, torch.Generator().manual_seed(seed)) * std + mean

    plain = create_strong_batch_transform(SIZE, MEAN, STD, only())
    inverted = create_strong_batch_transform(SIZE, MEAN, STD, only(invert_probability=1.0))
    torch.testing.assert_close(pixels(inverted, 1), 1.0 - pixels(plain, 1), atol=1e-5, rtol=0)

    grey = create_strong_batch_transform(SIZE, MEAN, STD, only(grayscale_probability=1.0))
    out = grey(images, generator)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])

    cutout = create_strong_batch_transform(SIZE, MEAN, STD, only(cutout_fraction=0.9))
    grey_level = (0.5 - MEAN[0]) / STD[0]
    erased = (cutout(images, generator) == grey_level).all(dim=1)
    assert erased.any() and not erased.all()

    strong = create_strong_batch_transform(SIZE, MEAN, STD, StrongAugmentSection())
    first = strong(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, strong(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, strong(images, torch.Generator().manual_seed(4)))


def test_params_yaml_self_training_defaults_agree_with_the_config():
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert SelfTrainingSection.model_validate(raw["finetune"]["self_training"]) == (
        SelfTrainingSection()
    )
    assert load_params(PROJECT_ROOT / "params.yaml").finetune.self_training == (
        SelfTrainingSection()
    )


# --- the finetune stage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_project(tmp_path_factory, one_thread):
    """A tiny project taken through prepare, validate and pretrain (real training: slow)."""
    from roadshift.cli import main
    from tests.helpers import TINY_PARAMS, make_project

    root = make_project(tmp_path_factory.mktemp("self-training"), TINY_PARAMS)
    for stage in ("prepare", "validate", "pretrain"):
        assert main(["--root", str(root), "stage", stage]) == 0, stage
    return root


def finetune(root, unlabelled_images=None, **self_training):
    from roadshift.config import parse_params
    from roadshift.stages.finetune import run_finetune

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["finetune"].update(strategy="fine_tune", epochs=1)
    raw["finetune"]["self_training"].update(self_training)
    return run_finetune(parse_params(raw), root, unlabelled_images=unlabelled_images)


@pytest.mark.slow
def test_the_finetune_stage_records_whether_self_training_ran(pretrained_project, capsys):
    import json

    from roadshift.layout import Layout

    layout = Layout(pretrained_project)
    metrics_path = layout.metrics("finetune")
    # auto with no images passed reads the project's validated unlabelled pool: on
    outcome = finetune(pretrained_project)
    assert "self-training on 16 unlabelled target images" in capsys.readouterr().out
    assert outcome.metrics["self_training"] == 1.0
    assert outcome.metrics["self_training_unlabelled_images"] == 16.0
    pool = layout.validated_unlabeled_manifest
    with_pool = pool.read_text()
    pool.write_text(with_pool.splitlines()[0] + "\n")  # an empty pool: the header alone
    try:
        # auto without unlabelled images: off (measured not worth its time on train images)
        outcome = finetune(pretrained_project)
        assert outcome.metrics["self_training"] == 0.0
        assert "self_training_mask_rate" not in outcome.metrics
        # true without unlabelled images: the target train images stand in
        outcome = finetune(pretrained_project, enabled=True, epochs=2)
        assert "self-training on 32 target train images" in capsys.readouterr().out
    finally:
        pool.write_text(with_pool)
    metrics = json.loads(metrics_path.read_text())
    assert metrics == pytest.approx(outcome.metrics)
    assert metrics["self_training"] == 1.0 and metrics["self_training_epochs"] == 2.0
    assert 0.0 <= metrics["self_training_mask_rate"] <= 1.0
    assert metrics["self_training_best_epoch"] in (0.0, 1.0, 2.0)
    assert metrics["self_training_unlabelled_images"] == 32.0
    assert len(outcome.details["self_training_history"]) == 2
    # auto with unlabelled images (decoded at the model's input size): on
    unlabelled = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    outcome = finetune(pretrained_project, unlabelled_images=unlabelled, epochs=1)
    assert "self-training on 20 unlabelled target images" in capsys.readouterr().out
    assert outcome.metrics["self_training"] == 1.0
    assert outcome.metrics["self_training_unlabelled_images"] == 20.0
    # images of another size are refused with the expected shape named
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32, 3\)"):
        finetune(pretrained_project, unlabelled_images=unlabelled[:, :16, :16], epochs=1)


@pytest.mark.slow
def test_without_a_target_val_split_auto_self_trains_and_keeps_its_last_epoch(pretrained_project):
    """The normal shape of a few-label target: train and test, no val. Nothing can compare
    epochs, so the last is kept (the register stage's baseline gates still judge it), and
    the val accuracy is left out of the metrics file rather than written as NaN."""
    import json

    import pandas as pd

    from roadshift.layout import Layout

    layout = Layout(pretrained_project)
    manifest = layout.validated_manifest("target")
    with_val = manifest.read_text()
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame[frame["split"] != "val"].to_csv(manifest, index=False)
    try:
        outcome = finetune(pretrained_project, epochs=2)
    finally:
        manifest.write_text(with_val)
    assert outcome.metrics["self_training"] == 1.0
    assert outcome.metrics["self_training_best_epoch"] == 2.0
    text = layout.metrics("finetune").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert "target_val_accuracy" not in metrics
    assert metrics["left_out"] == {"target_val_accuracy": "the target has no val split"}
