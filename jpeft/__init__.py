"""jpeft: parameter-efficient fine-tuning as pure functions over JAX/Flax parameter pytrees.

    adapted = jpeft.apply(params, "rhoft", key=jax.random.key(0), r_u=16, r_v=16, k=1024)
    trainable, frozen = jpeft.partition(adapted)
    merged = jpeft.materialize(adapted)
    logits = jpeft.wrap(model.apply)({"params": adapted}, x)   # any unmodified Flax model
    jpeft.count_params(adapted)
"""

from jpeft.core import apply, combine, count_params, linear, materialize, partition, with_rank
from jpeft import optim
from jpeft.methods.base import Method
from jpeft.methods.registry import methods, register
from jpeft.tree import DEFAULT_TARGETS, match_targets
from jpeft.wrap import wrap
from jpeft.node import Node, Quantized, is_node, is_quantized
from jpeft.quantized import dequantize, quantize

__all__ = [
    "DEFAULT_TARGETS",
    "Method",
    "Node",
    "Quantized",
    "apply",
    "combine",
    "count_params",
    "dequantize",
    "is_node",
    "is_quantized",
    "linear",
    "match_targets",
    "materialize",
    "methods",
    "optim",
    "partition",
    "quantize",
    "register",
    "with_rank",
    "wrap",
]
__version__ = "0.1.0"
