"""Scale-out on torch.distributed: latent parallelism with an exact batch-wide top-k, data parallelism
across replicas of the latent shards, sharded checkpoints. Uses torch.distributed's collectives and DeviceMesh
only (gloo on CPUs, NCCL on GPUs); no communication layer of its own.

    mesh = distributed.make_mesh(latent_parallel=4)          # under torchrun, after init_process_group
    model = distributed.ShardedCrossCoder.from_crosscoder(cc, mesh)  # cc built with the same seed on every rank
    distributed.train(model, store, cx.TrainConfig(batch_size=8192, ...))  # = cx.train(cc, store, ...) on 1 GPU
"""

from .batch_topk import batch_topk_sharded, kth_largest_key, score_keys
from .checkpoints import is_sharded, load_merged, read_training_state
from .layer import ShardedCrossCoder
from .mesh import Mesh, latent_range, make_mesh
from .train import train

__all__ = [
    "batch_topk_sharded",
    "kth_largest_key",
    "score_keys",
    "ShardedCrossCoder",
    "Mesh",
    "latent_range",
    "make_mesh",
    "train",
    "is_sharded",
    "load_merged",
    "read_training_state",
]
