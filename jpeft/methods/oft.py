"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023; thesis §5.2).

Thesis notation, ``M`` (out × in): ``M' = R M`` with ``R = diag(R_1, …, R_{out/b})``
block-diagonal and each block a Cayley transform ``R_i = (I + Q_i)(I - Q_i)^{-1}`` of a
skew-symmetric ``Q_i`` (b(b-1)/2 free entries, zero at init so ``R = I``). With
``scale=True`` it is the thesis' ``M' = R M D`` (eq. 5.4), ``D = diag(d)`` over the
inputs, ``d = 1`` at init. ``side="in"`` rotates the inputs instead, ``M' = M R`` (``R``
over ``in``), which is what HF PEFT ≥ 0.15 does: with ``side="in"``, ``q`` equals PEFT's
``oft_R.weight`` and the exact Cayley transforms agree.

On the Flax kernel ``K = Mᵀ``: ``side="out"`` gives ``K' = D K Rᵀ``, ``side="in"`` gives
``K' = D Rᵀ K``.

``neumann_terms=t`` replaces the solve by the truncated series (see
:func:`jpeft.linalg.cayley`).

Paths: factored ``y = ((x ⊙ d) K) Rᵀ`` (or ``((x ⊙ d) Rᵀ) K``) rotates activations block by
block, ``O(T·dim·b)``, and leaves ``K`` without a weight gradient; materializing costs the
``6·T·in·out`` of a dense trainable weight. Factored is chosen whenever ``b < in·out/dim``,
i.e. always for square layers.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node

SIDES = ("out", "in")


@dataclasses.dataclass(frozen=True)
class OftConfig:
    """block_size: size b of each orthogonal block (must divide the rotated dimension);
    scale: learn the input scaling ``D`` (``R M D``); side: ``"out"`` (thesis, ``R M``) or
    ``"in"`` (PEFT, ``M R``); neumann_terms: None for the exact Cayley solve, else the
    number of Neumann-series terms."""

    block_size: int = 64
    scale: bool = False
    side: str = "out"
    neumann_terms: int | None = None

    def __post_init__(self):
        base.positive_int("block_size", self.block_size)
        base.require(isinstance(self.scale, bool), f"scale must be a bool, got {self.scale!r}")
        base.require(self.side in SIDES, f"side must be one of {SIDES}, got {self.side!r}")
        if self.neumann_terms is not None:
            base.positive_int("neumann_terms", self.neumann_terms)

    def rotated_dim(self, shape) -> int:
        return shape[1] if self.side == "out" else shape[0]

    def check(self, shape):
        dim = self.rotated_dim(shape)
        base.require(
            dim % self.block_size == 0,
            f"block_size={self.block_size} does not divide the rotated dimension {dim} "
            f"(side={self.side!r}) of a {shape} kernel",
        )


def init(key, kernel, config: OftConfig):
    b = config.block_size
    blocks = config.rotated_dim(kernel.shape) // b
    trainable = {"q": jnp.zeros((blocks, b * (b - 1) // 2), jnp.float32)}
    if config.scale:
        trainable["scale"] = jnp.ones((kernel.shape[0],), jnp.float32)
    return trainable, {"kernel": kernel}


def rotation_blocks(node: Node):
    """The blocks ``R_i`` (num_blocks, b, b), float32."""
    cfg = node.config
    return linalg.cayley(linalg.skew_from_vector(node.trainable["q"], cfg.block_size), cfg.neumann_terms)


def materialize(node: Node):
    kernel = node.frozen["kernel"].astype(jnp.float32)
    blocks = rotation_blocks(node)
    if node.config.side == "out":
        rotated = linalg.apply_block_diag(kernel, jnp.swapaxes(blocks, -1, -2))  # K Rᵀ
    else:
        rotated = linalg.apply_block_diag(kernel.T, blocks).T  # Rᵀ K
    return rotated * node.trainable["scale"][:, None] if node.config.scale else rotated


def factored(x, node: Node, dropout_key=None):
    blocks_t = jnp.swapaxes(rotation_blocks(node), -1, -2)
    if node.config.scale:
        x = x * node.trainable["scale"].astype(x.dtype)
    kernel = node.frozen["kernel"].astype(x.dtype)
    if node.config.side == "out":
        return linalg.apply_block_diag(x @ kernel, blocks_t)
    return linalg.apply_block_diag(x, blocks_t) @ kernel


def flops(node: Node, tokens: int):
    dim = node.config.rotated_dim(node.shape)
    rotate = 3 * 2.0 * tokens * dim * node.config.block_size
    build = 3 * 2.0 * node.shape[0] * node.shape[1] * node.config.block_size
    return base.frozen_step_flops(node, tokens) + rotate, base.dense_step_flops(node, tokens) + build


METHOD = base.Method(OftConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
