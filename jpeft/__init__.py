"""jpeft: parameter-efficient fine-tuning as pure functions over JAX/Flax parameter pytrees.

    adapted = jpeft.apply(params, "rhoft", key=jax.random.key(0), r_u=16, r_v=16, k=1024)
    trainable, frozen = jpeft.partition(adapted)
    merged = jpeft.materialize(adapted)
    logits = jpeft.wrap(model.apply)({"params": adapted}, x)   # any unmodified Flax model
    jpeft.count_params(adapted)
"""

import importlib

from jpeft.core import apply, combine, count_params, linear, materialize, partition, with_rank
from jpeft import optim
from jpeft.methods.base import Method
from jpeft.methods.registry import methods, register
from jpeft.tree import DEFAULT_TARGETS, match_targets
from jpeft.wrap import wrap
from jpeft.node import Node, Quantized, is_node, is_quantized
from jpeft.quantized import dequantize, quantize

#: The public modules, each reachable as ``jpeft.NAME``: those the API above does not import
#: load on first use (PEP 562), so ``import jpeft`` stays as light as that API (no flax,
#: orbax, torch or transformers until a module needs them). ``jpeft.methods`` is the
#: registry and ``jpeft.wrap`` the function (import their modules by name).
SUBMODULES = (
    "bench", "checkpoint", "cli", "core", "counter_rng", "data", "demo", "eval", "hooks", "layout", "linalg",
    "models", "node", "optim", "peft_format", "pipeline", "quant", "quantized", "report", "sharding", "train", "tree",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"jpeft.{name}")  # binds jpeft.NAME, so this runs once per module
    raise AttributeError(f"module 'jpeft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *SUBMODULES})


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
