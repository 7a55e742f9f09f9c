"""Data-parallel training through ``torchrun``: one process per device, gloo on CPU, NCCL on GPU.

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; a plain ``roadshift`` run
sees none of them and everything here degrades to a single process. Only rank 0
writes outputs, checkpoints and tracking data; every rank trains.

torch is imported where it is needed, not at module level: every stage command comes
through here, and prepare and validate would otherwise pay ~1 s of start-up for it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# How many processes a training stage runs on: unset or 1 = one; N; "gpu" = one per visible
# GPU. An environment switch (a work pool's job variables), so dvc.yaml's stage commands
# and their hashes stay the same whichever machine runs them.
TRAIN_PROCESSES_ENV = "ROADSHIFT_TRAIN_PROCESSES"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def requested_processes() -> int:
    """``ROADSHIFT_TRAIN_PROCESSES`` as a process count; a bad value is refused by name."""
    raw = os.environ.get(TRAIN_PROCESSES_ENV, "").strip().lower()
    if raw in ("", "1"):
        return 1
    if raw == "gpu":
        import torch

        return max(1, torch.cuda.device_count())
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    from roadshift.config import ConfigError

    raise ConfigError(
        f"{TRAIN_PROCESSES_ENV}={raw!r}: expected a process count (1, 2, ...) or 'gpu' "
        "(one process per visible GPU)"
    )


def torchrun_command(processes: int, roadshift_argv: list[str]) -> list[str]:
    """The same ``roadshift`` command, one process per rank, on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", "-m", "roadshift", *roadshift_argv,
    ]  # fmt: skip


def _initialised_distributed() -> ModuleType | None:
    """torch.distributed once a process group exists; None before (torch maybe not imported)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def current_group() -> ProcessGroup:
    dist = _initialised_distributed()
    if dist is not None:
        return ProcessGroup(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    return ProcessGroup()


def is_main_process() -> bool:
    """True outside torchrun, and on rank 0 under it (also before the group is initialised)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the torchrun process group if launched by torchrun; returns this rank's device."""
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return _rank_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return _rank_device(device)


def _rank_device(device: torch.device) -> torch.device:
    import torch

    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    dist = _initialised_distributed()
    if dist is not None:
        dist.barrier()


def shutdown_distributed() -> None:
    dist = _initialised_distributed()
    if dist is not None:
        dist.destroy_process_group()
