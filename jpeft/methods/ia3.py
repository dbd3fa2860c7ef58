"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu, Tam, Muqeeth,
Mohta, Huang, Bansal & Raffel, T-Few, NeurIPS 2022; HF PEFT's ``IA3Config``).

The paper rescales activations with learned vectors: the attention keys and values
(``softmax(Q (l_k ⊙ Kᵀ)) (l_v ⊙ V)``) and the feed-forward's hidden activation before its
output projection (``(l_ff ⊙ γ(W₁ x)) W₂``). As a reparametrized weight, ``W`` (out × in),
``y = W x``:

    outputs (default, keys/values):   y = l ⊙ (W x),    W' = diag(l) W,
    inputs (``feedforward=True``):     y = W (l ⊙ x),    W' = W diag(l).

On the Flax kernel ``K = Wᵀ`` (in, out), ``y = x K``: ``y = (x K) ⊙ l`` scales the columns
of ``K`` (``l`` has ``out`` entries), and ``y = (x ⊙ l) K`` its rows (``in`` entries).
Orientation in one line: ``l`` multiplies the kernel's output axis, or with
``feedforward=True`` its input axis. HF PEFT mapping: ``ia3_l = l`` reshaped to PEFT's
(out, 1), or (1, in) for a module listed in ``feedforward_modules``.

Init: ``l = 1``, so ``K' = K`` exactly.

Bias: PEFT's output-side (IA)³ multiplies the base layer's whole output, bias included
(``l ⊙ (W x + b)``); a jpeft node stands for the kernel alone, so here the bias is left as
it is (``l ⊙ (W x) + b``). The two agree on bias-free layers, which the paper's T5 layers
are; on a biased layer (Phi's Q/K/V) PEFT's output is ours plus ``(l - 1) ⊙ b``, a
difference ``tests/test_peft_parity.py`` writes out. The input side is the same in both.

Paths: factored costs ``4·T·n·m`` plus ``O(T·out)`` (``O(T·in)`` on the input side) per
training step; materializing pays the dense weight gradient ``6·T·n·m`` plus ``3·n·m``.
The factored path always wins.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class Ia3Config:
    """feedforward: scale the layer's inputs (PEFT's ``feedforward_modules``: a
    feed-forward output projection) instead of its outputs (keys, values)."""

    feedforward: bool = False

    def __post_init__(self):
        base.require(isinstance(self.feedforward, bool), f"feedforward must be True or False, got {self.feedforward!r}")

    def check(self, shape: tuple[int, int]) -> None:
        """Every kernel shape fits."""


def init(key: jax.Array, kernel: jax.Array, config: Ia3Config) -> tuple[dict, dict]:
    n, m = kernel.shape
    return {"l": jnp.ones(n if config.feedforward else m, jnp.float32)}, {"kernel": kernel}


def materialize(node: Node) -> jax.Array:
    kernel = node.frozen["kernel"].astype(jnp.float32)
    l = node.trainable["l"]
    return kernel * l[:, None] if node.config.feedforward else kernel * l


def factored(x: jax.Array, node: Node, dropout_key: jax.Array | None = None) -> jax.Array:
    kernel = node.frozen["kernel"].astype(x.dtype)
    l = node.trainable["l"].astype(x.dtype)
    return (x * l) @ kernel if node.config.feedforward else (x @ kernel) * l


def flops(node: Node, tokens: int) -> tuple[float, float]:
    n, m = node.shape
    width = n if node.config.feedforward else m
    # the product with l forward, its input gradient, and l's gradient (product and sum)
    scale = 4.0 * tokens * width
    # K ⊙ l forward, and l's gradient: the product with the weight gradient and its sum
    rebuild = 3.0 * n * m
    return base.frozen_step_flops(node, tokens) + scale, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(Ia3Config, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
