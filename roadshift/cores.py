"""How the training stages share the machine's CPU cores.

Light on purpose (torch is imported only where a device must be resolved): the flow
consults it before it has imported torch.
"""

from __future__ import annotations

import os
import sys

from roadshift.config import BaseSection

# Stages the pipeline trains at the same time where the machine allows (`roadshift run`):
# both train a small model on the small target split, and on a few CPU cores two
# single-threaded trainings get through ~1.4x the images of one on two threads (intra-op
# threads scale poorly at these batch sizes; bench/RESULTS.md). Each takes its share of
# the cores whether or not they overlap (torch_threads), so the schedule never changes
# the weights.
TRAINED_SIDE_BY_SIDE = ("finetune", "scratch")


def torch_threads(base: BaseSection, sharing: int = 1) -> int:
    """``base.num_threads``, or else the cores split evenly among ``sharing`` stages.

    The thread count changes a CPU run's floating-point sums, so it must not depend on
    whether the stages that share the cores happen to run at the same time: a plain
    ``dvc repro`` runs them one after the other and computes the same weights.
    """
    return base.num_threads or max(1, (os.cpu_count() or 1) // sharing)


def side_by_side_refusal(base: BaseSection) -> str | None:
    """Why :data:`TRAINED_SIDE_BY_SIDE` must train one after the other here; None if they
    can share the machine."""
    from roadshift.distributed import requested_processes

    sharing = len(TRAINED_SIDE_BY_SIDE)
    threads, cores = torch_threads(base, sharing), os.cpu_count() or 1
    if sharing * threads > cores:
        return f"{sharing} stages x base.num_threads={threads} is more than the {cores} cores"
    if requested_processes() > 1:
        return "each stage runs as a torchrun group (ROADSHIFT_TRAIN_PROCESSES)"
    if base.device == "cuda" or (base.device == "auto" and _cuda_available()):
        return "they train on the GPU"
    return None


# present wherever a GPU driver is loaded (NVIDIA; AMD's ROCm for torch.cuda on ROCm)
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd")


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch (~1 s, which an unchanged
    rerun would pay only for this question) where no GPU driver is loaded at all."""
    if "torch" not in sys.modules and not any(map(os.path.exists, GPU_DRIVER_PATHS)):
        return False
    import torch

    return torch.cuda.is_available()
