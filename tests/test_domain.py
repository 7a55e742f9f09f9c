"""Domain distance: embeddings and the proxy A-distance (logged by ``strategy: auto`` for
information; the choice itself is cross-validated, tests/test_auto_strategy.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from roadshift.train.models import create_model
from roadshift.transfer.domain import embed, head_inputs, proxy_a_distance

ARCH = "mobilenet_v3_small"
CPU = torch.device("cpu")


def gaussian(n: int, dim: int = 32, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator) + shift


# --- proxy A-distance --------------------------------------------------------------------------


def test_two_samples_of_one_distribution_are_about_zero_apart():
    assert proxy_a_distance(gaussian(200, seed=1), gaussian(200, seed=2), seed=0) < 0.3


def test_well_separated_domains_are_about_two_apart():
    assert proxy_a_distance(gaussian(100, seed=1), gaussian(100, shift=3.0, seed=2), seed=0) > 1.9


def test_unequal_sample_sizes_do_not_look_like_a_shift():
    """Without the balanced subsample, always answering "source" would score 300/350."""
    assert proxy_a_distance(gaussian(300, seed=1), gaussian(50, seed=2), seed=0) < 0.5


def test_the_distance_is_repeatable_for_a_seed_and_scale_free():
    source, target = gaussian(60, seed=1), gaussian(60, shift=0.3, seed=2)
    first = proxy_a_distance(source, target, seed=3)
    assert proxy_a_distance(source, target, seed=3) == first
    assert proxy_a_distance(10 * source, 10 * target, seed=3) == pytest.approx(
        first
    )  # L2-normalised
    assert 0.0 <= first <= 2.0


def test_too_few_embeddings_is_an_error_not_a_number():
    with pytest.raises(ValueError, match="at least 2"):
        proxy_a_distance(gaussian(1), gaussian(10), seed=0)


# --- embeddings --------------------------------------------------------------------------------


def loader(n: int = 10, batch_size: int = 4) -> DataLoader:
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(images, torch.arange(n)), batch_size=batch_size)


def test_embed_returns_what_the_head_receives_in_eval_mode():
    torch.manual_seed(0)
    model = create_model(ARCH, 8)
    model.train()
    model.features[3].eval()  # a mode set module by module must come back as it was
    features, labels = head_inputs(model, ARCH, loader(), CPU)
    assert features.shape == (10, 576)
    assert torch.equal(labels, torch.arange(10))
    images = torch.cat([x for x, _ in loader()])
    with torch.no_grad():
        model.eval()
        expected = torch.flatten(model.avgpool(model.features(images)), 1)
        assert torch.allclose(features, expected, atol=1e-5)
        with_head = model.classifier(features)
        assert torch.allclose(with_head, model(images), atol=1e-5)
    model.train()
    model.features[3].eval()
    embed(model, ARCH, loader(), CPU)
    assert model.training and model.classifier.training and not model.features[3].training
    assert not model.classifier._forward_pre_hooks  # the hook is gone


def test_embed_stops_at_the_limit():
    model = create_model(ARCH, 8)
    assert embed(model, ARCH, loader(n=10, batch_size=4), CPU, limit=5).shape == (5, 576)
    assert embed(model, ARCH, loader(n=3), CPU, limit=5).shape == (3, 576)


def test_an_empty_loader_has_nothing_to_embed():
    with pytest.raises(ValueError, match="no images"):
        embed(create_model(ARCH, 8), ARCH, [], CPU)


def test_embed_works_for_a_head_that_flattens_itself():
    """ConvNeXt's classifier receives (N, C, 1, 1); the cached input must still fit it."""
    model = nn.Sequential()
    model.features = nn.Conv2d(3, 4, 3)
    model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    features = embed(model, "convnext_tiny", loader(n=4), CPU)
    assert features.shape == (4, 4, 30, 30)
    assert model.classifier(features).shape == (4, 2)
