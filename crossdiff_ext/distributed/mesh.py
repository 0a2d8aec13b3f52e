"""The 2-D process mesh of a scaled-out crosscoder: data replicas x latent shards.

World rank = data_rank * latent_parallel + latent_rank, so the latent shards of one replica are neighbours (on
one node when latent_parallel <= GPUs per node: the per-step reconstruction all-reduce then stays on NVLink, and
only the gradient all-reduce of the data dimension crosses nodes). The groups come from torch's DeviceMesh.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class Mesh:
    latent_group: Any  # ProcessGroup of the ranks that split the latents (same rows)
    data_group: Any  # ProcessGroup of the replicas of this latent shard (different rows)
    latent_rank: int
    latent_size: int
    data_rank: int
    data_size: int

    @property
    def groups(self) -> list[Any]:
        """Both groups: reducing over each in turn reduces over the whole mesh."""
        return [self.latent_group, self.data_group]

    def latent_range(self, dict_size: int) -> tuple[int, int]:
        """(first, end) latent ids of this rank's shard."""
        return latent_range(dict_size, self.latent_rank, self.latent_size)


def latent_range(dict_size: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous blocks, the first dict_size % size of them one latent larger."""
    if not 0 <= rank < size:
        raise InputError(f"rank must be in [0, {size}), got {rank}")
    if dict_size < size:
        raise InputError(f"dict_size = {dict_size} cannot be split into {size} latent shards")
    base, extra = divmod(dict_size, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (1 if rank < extra else 0)


def make_mesh(latent_parallel: int, device_type: Optional[str] = None) -> Mesh:
    """The mesh over every rank of the initialised default process group: latent_parallel shards per replica,
    world_size / latent_parallel replicas. device_type: "cuda" or "cpu" (default: cuda for NCCL, cpu otherwise)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "make_mesh needs an initialised process group (torch.distributed.init_process_group, e.g. under torchrun)"
        )
    world = dist.get_world_size()
    if not isinstance(latent_parallel, int) or latent_parallel < 1 or world % latent_parallel:
        raise InputError(
            f"latent_parallel must be an int >= 1 dividing the world size {world}, got {latent_parallel!r}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    shape = (world // latent_parallel, latent_parallel)
    device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=("data", "latent"))
    rank = dist.get_rank()
    return Mesh(
        latent_group=device_mesh.get_group("latent"),
        data_group=device_mesh.get_group("data"),
        latent_rank=rank % latent_parallel,
        latent_size=latent_parallel,
        data_rank=rank // latent_parallel,
        data_size=shape[0],
    )
