"""Run by torchrun in tests: each rank trains the tiny blobs model and saves what it ended with."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from roadshift.config import BaseSection
from roadshift.train.distributed import current_group, shutdown_distributed
from roadshift.train.loop import FitOptions, configure_runtime, fit
from tests.helpers import Blobs, loaders, tiny_net


def main(out_dir: Path) -> None:
    device = configure_runtime(BaseSection(seed=3, num_threads=1))
    group = current_group()
    model = tiny_net()
    train_loader, val_loader = loaders(seed=3)
    seen: list[int] = []
    for batch in train_loader.batch_sampler:
        seen.extend(batch)
    result = fit(
        model,
        [{"params": list(model.parameters()), "lr": 0.05}],
        train_loader,
        val_loader,
        FitOptions(epochs=3, seed=3),
        device=device,
    )
    torch.save(
        {
            "state": model.state_dict(),
            "indices": torch.tensor(seen),
            "world_size": group.world_size,
            "val_accuracy": result.best_val_accuracy,
            "dataset_size": len(Blobs(64, 1)),
        },
        out_dir / f"rank{group.rank}.pt",
    )
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
