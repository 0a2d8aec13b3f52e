"""The crossdiff ops: one module per op family, each with its reference, fake kernel and autograd formula."""

# The kernel tables register themselves with backends: the references, the C++ ops, and the crossdiff_triton ops
# (triton itself is imported on the first launch).
from . import native, reference, triton_ops  # noqa: F401
from .autograd import decode_sparse, encode_sparse
from .encode import paired_encode, paired_encode_reference
from .select import batch_topk, batch_topk_reference, selection_scores, threshold_select, threshold_select_reference
from .sparse import (
    latent_order,
    latent_order_by_sort,
    latent_order_reference,
    sparse_decode,
    sparse_decode_reference,
    sparse_values_grad,
    sparse_values_grad_reference,
    sparse_weight_grad,
    sparse_weight_grad_reference,
)

__all__ = [
    "paired_encode",
    "paired_encode_reference",
    "batch_topk",
    "batch_topk_reference",
    "selection_scores",
    "threshold_select",
    "threshold_select_reference",
    "latent_order",
    "latent_order_reference",
    "latent_order_by_sort",
    "sparse_decode",
    "sparse_decode_reference",
    "sparse_values_grad",
    "sparse_values_grad_reference",
    "sparse_weight_grad",
    "sparse_weight_grad_reference",
    "decode_sparse",
    "encode_sparse",
]
