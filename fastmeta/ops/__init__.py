"""fastmeta ops: fused, task-batched PyTorch autograd ops for meta-learning.

Each op lives in one contract file (reference, checks, registered custom ops, autograd,
public function); ``registry`` decides which backend runs a call.
"""

from fastmeta.ops._loss import nll_accuracy
from fastmeta.ops.registry import BackendError, backends_for
from fastmeta.ops._inner_update import inner_update, inner_update_ref
from fastmeta.ops._matching import (
    matching_attention,
    matching_attention_ref,
    matching_loss,
    matching_loss_ref,
)
from fastmeta.ops._proto_loss import METRICS as PROTO_METRICS
from fastmeta.ops._proto_loss import proto_logits, proto_logits_ref, proto_loss, proto_loss_ref
from fastmeta.ops._prototypes import prototypes, prototypes_ref
from fastmeta.ops._mlp_hvp import mlp_grad, mlp_grad_hvp, mlp_grad_hvp_ref, mlp_grad_ref
from fastmeta.ops._gaussian_product import gaussian_product, gaussian_product_ref

__all__ = [
    "nll_accuracy",
    "PROTO_METRICS",
    "BackendError",
    "backends_for",
    "inner_update",
    "inner_update_ref",
    "matching_attention",
    "matching_attention_ref",
    "matching_loss",
    "matching_loss_ref",
    "proto_logits",
    "proto_logits_ref",
    "proto_loss",
    "proto_loss_ref",
    "prototypes",
    "prototypes_ref",
    "mlp_grad",
    "mlp_grad_hvp",
    "mlp_grad_hvp_ref",
    "mlp_grad_ref",
    "gaussian_product",
    "gaussian_product_ref",
]
