"""Scale-out on torch.distributed (issue 8): latent-parallel exact batch top-k. Uses torch.distributed's
collectives only (gloo on CPUs, NCCL on GPUs); no communication layer of its own."""
from .batch_topk import batch_topk_sharded, kth_largest_key, score_keys

__all__ = ["batch_topk_sharded", "kth_largest_key", "score_keys"]
