"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo, Ye-Bin & Oh, FedPara, ICLR 2022;
LyCORIS; HF PEFT's ``LoHaConfig``).

Paper/PEFT notation, ``W`` (out × in): ``W' = W + s · (B₁ A₁) ⊙ (B₂ A₂)`` with ``B_k``
(out × r), ``A_k`` (r × in) and ``s = α / r``; the Hadamard product of two rank-``r``
matrices reaches rank ``r²`` with ``2r(in + out)`` parameters. On the Flax kernel
``K = Wᵀ`` (in, out):

    K' = K + s · (w1_b w1_a) ⊙ (w2_b w2_a),   w_k_b = A_kᵀ (in × r),  w_k_a = B_kᵀ (r × out).

Orientation: the ``_b`` factors act on inputs, the ``_a`` factors on outputs. HF PEFT
mapping (each array is the transpose of PEFT's of the same name): ``hada_w1_a = w1_aᵀ``,
``hada_w1_b = w1_bᵀ``, ``hada_w2_a = w2_aᵀ``, ``hada_w2_b = w2_bᵀ``.

Init (PEFT's ``reset_adapter_parameters``, after FedPara's He init): PyTorch's
``kaiming_uniform_(a=sqrt(5))`` on PEFT's ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, i.e.
``w1_a``, ``w2_a ~ U(±1/√r)`` and ``w1_b ~ U(±1/√in)``, and ``w2_b = 0``, so ``K' = K``
exactly at init. PEFT's ``rank_dropout`` and ``module_dropout`` are not implemented (PEFT's
defaults, 0).

Paths: the Hadamard product of two rank-``r`` products is one rank-``r²`` product of their
face-splitting (row-wise Khatri–Rao) products: ``(w1_b w1_a) ⊙ (w2_b w2_a) = U V`` with
``U[i, (p,q)] = w1_b[i,p] w2_b[i,q]`` (in × r²) and ``V[(p,q), j] = w1_a[p,j] w2_a[q,j]``
(r² × out). Factored ``y = x K + s · (x U) V`` costs ``4·T·n·m + 6·T·r²·(n+m)`` FLOP per
training step (plus ``O(r²·(n+m))`` to build ``U``, ``V`` and back-propagate through
them) and never forms an ``n × m`` array; materializing costs ``6·T·n·m`` plus
``12·n·r·m`` to rebuild the update and back-propagate through both products. The cost
model picks the cheaper: factored while ``6·T·r²·(n+m) ≤ 2·T·n·m + 12·n·r·m``, i.e. for
long inputs while ``r² ≤ n·m / (3(n+m))`` (r=16 on a 2048² layer: 256 < 341, factored,
1.34× LoRA's layer FLOP at 4096 tokens, 1.08× on the whole Phi-1.5 step), materialized
for larger ranks on long inputs (r=32: 1024 > 341).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class LohaConfig:
    """r: rank of each of the two factor products (the update reaches rank ``r²``);
    alpha: scale numerator, ``s = alpha / r`` (16 and 32 by default, the thesis' rank;
    PEFT's defaults are 8 and 8)."""

    r: int = 16
    alpha: float = 32.0

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("alpha", self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check(self, shape: tuple[int, int]) -> None:
        # as LoRA: a factor rank above min(in, out) adds parameters but no rank
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


def init(key: jax.Array, kernel: jax.Array, config: LohaConfig) -> tuple[dict, dict]:
    n, m = kernel.shape
    r = config.r
    k1a, k1b, k2a = jax.random.split(key, 3)
    trainable = {
        "w1_a": base.kaiming_uniform(k1a, (r, m), fan_in=r),  # PEFT's hada_w1_a (out × r): fan_in r
        "w1_b": base.kaiming_uniform(k1b, (n, r), fan_in=n),  # hada_w1_b (r × in): fan_in in
        "w2_a": base.kaiming_uniform(k2a, (r, m), fan_in=r),
        "w2_b": jnp.zeros((n, r), jnp.float32),
    }
    return trainable, {"kernel": kernel}


def face_split(node: Node) -> tuple[jax.Array, jax.Array]:
    """``(U, V)`` in float32 with ``U V = (w1_b w1_a) ⊙ (w2_b w2_a)``: ``U`` (in × r²),
    ``V`` (r² × out)."""
    t = node.trainable
    n, m = node.shape
    r = node.config.r
    u = (t["w1_b"][:, :, None] * t["w2_b"][:, None, :]).reshape(n, r * r)
    v = (t["w1_a"][:, None, :] * t["w2_a"][None, :, :]).reshape(r * r, m)
    return u, v


def delta(node: Node) -> jax.Array:
    """``s · (w1_b w1_a) ⊙ (w2_b w2_a)`` (in, out) in float32."""
    t = node.trainable
    return node.config.scale * ((t["w1_b"] @ t["w1_a"]) * (t["w2_b"] @ t["w2_a"]))


def materialize(node: Node) -> jax.Array:
    return node.frozen["kernel"].astype(jnp.float32) + delta(node)


def factored(x: jax.Array, node: Node, dropout_key: jax.Array | None = None) -> jax.Array:
    u, v = face_split(node)
    v = v * node.config.scale  # scale the r² × out factor, not the T × out output
    return x @ node.frozen["kernel"].astype(x.dtype) + (x @ u.astype(x.dtype)) @ v.astype(x.dtype)


def flops(node: Node, tokens: int) -> tuple[float, float]:
    n, m = node.shape
    r2 = node.config.r**2
    # x U and (x U) V: forward, input gradient and factor gradient; building U, V (one
    # product each) and their backward (two products each), and the scale of V
    adapter = 6.0 * tokens * r2 * (n + m) + 5.0 * r2 * (n + m) + 2.0 * r2 * m
    # the two rank-r products forward (2nrm each) and backward (4nrm each)
    rebuild = 12.0 * n * node.config.r * m
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(LohaConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
