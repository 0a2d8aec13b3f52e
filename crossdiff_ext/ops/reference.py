"""The plain-PyTorch references of every op, as the "reference" backend's kernel table."""
from types import SimpleNamespace

from .. import backends

from .encode import paired_encode_reference
from .select import batch_topk_reference, threshold_select_reference
from .sparse import (latent_order_reference, sparse_decode_reference, sparse_values_grad_reference,
                     sparse_weight_grad_reference)

KERNELS = SimpleNamespace(
    paired_encode=paired_encode_reference,
    batch_topk=batch_topk_reference,
    threshold_select=threshold_select_reference,
    sparse_decode=sparse_decode_reference,
    sparse_values_grad=sparse_values_grad_reference,
    latent_order=latent_order_reference,
    sparse_weight_grad=sparse_weight_grad_reference,
)
backends.register("reference", KERNELS)
