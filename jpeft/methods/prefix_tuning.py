"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer ``l`` attends, besides the sequence, to P trainable key/value
positions: with ``K_l``, ``V_l`` the layer's keys and values (per head),

    attn_l(x) = softmax(q [Kᵖ_l; K_l]ᵀ / √d_h) [Vᵖ_l; V_l]

The prefixes are not rotated (they enter as a ``past_key_values`` cache would) and are
attended by every position; the tokens' positions count them (the first token is at
position P, as transformers numbers positions after a cache of P entries). The model is
frozen. The prefixes of all layers are one row per virtual token,
``Z ∈ R^{P × L·2·H·d_h}`` (``L`` layers, ``H`` key/value heads of width ``d_h``; ``H·d_h``
is the hidden size ``d`` of a model without grouped-query attention):

    projection=False:  Z trainable
    projection=True:   Z = tanh(E W₁ + b₁) W₂ + b₂,   E ∈ R^{P×d}, W₁: d×e, W₂: e×(L·2·H·d_h)

and, as PEFT, ``Z.reshape(P, L, 2, H, d_h)``: layer ``l``'s key is ``Z[:, l, 0]`` and its
value ``Z[:, l, 1]`` (PEFT's ``view(B, P, L*2, H, D).permute(2, 0, 3, 1, 4).split(2)``).

HF PEFT (0.21, ``PrefixTuningConfig``, ``peft/tuners/prefix_tuning/model.py``):
``prefix_projection`` (default False) is ``projection``; ``encoder_hidden_size`` ``e``
defaults to the model's hidden size (used with the projection only: here refused
without it); ``init_weights="zero"`` has no counterpart (PEFT's default, random, is the
one here). Arrays and PEFT's tensors: ``embedding`` = ``embedding.weight`` (P × L·2·d
without projection, P × d with it); ``kernel_0``/``bias_0`` = ``transform.0.weight``ᵀ/``.bias``,
``kernel_1``/``bias_1`` = ``transform.2.weight``ᵀ/``.bias``.

Init (PEFT's, i.e. torch's defaults): ``embedding ~ N(0, 1)`` (``nn.Embedding``), each
Linear's weight and bias ``U(±1/√fan_in)`` (``nn.Linear``).

Hook point: ``"prefix"`` (:mod:`jpeft.hooks`). Parameters: ``P·L·2·H·d_h`` without
projection (Phi-1.5 at P = 20: 20·24·2·2048 = 1,966,080); with it
``P·d + (d·e + e) + (e·L·2·H·d_h + L·2·H·d_h)`` (Phi-1.5, e = d: 205,662,208).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.methods.p_tuning import torch_init
from jpeft.methods.prompt_tuning import check_virtual_tokens
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    """num_virtual_tokens: P, the prefix length; projection: produce the prefixes with
    PEFT's two-layer tanh MLP (``prefix_projection``); encoder_hidden_size: its width e
    (``None``: the model's hidden size, as PEFT)."""

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        base.positive_int("num_virtual_tokens", self.num_virtual_tokens)
        base.require(isinstance(self.projection, bool), f"projection must be True or False, got {self.projection!r}")
        if self.encoder_hidden_size is not None:
            base.require(self.projection,
                         "encoder_hidden_size is the width of the prefix projection: it needs projection=True")
            base.positive_int("encoder_hidden_size", self.encoder_hidden_size)

    def check(self, dims) -> None:
        check_virtual_tokens(self.num_virtual_tokens, dims)


def _prefix_width(dims) -> int:
    """L·2·H·d_h: one virtual token's keys and values in every layer."""
    return dims.layers * 2 * dims.heads * dims.head_dim


def init(key, dims, config: PrefixTuningConfig, params):
    p, width = config.num_virtual_tokens, _prefix_width(dims)
    if not config.projection:
        return torch_init(key, (p, width), ()), {}
    d = dims.hidden
    e = config.encoder_hidden_size or d
    specs = (("kernel_0", (d, e), d), ("bias_0", (e,), d), ("kernel_1", (e, width), e), ("bias_1", (width,), e))
    return torch_init(key, (p, d), specs), {}


def flat_prefix(node: Node) -> jax.Array:
    """``Z`` (P, L·2·H·d_h): every layer's keys and values, one row per virtual token."""
    t = node.trainable
    if not node.config.projection:
        return t["embedding"]
    return jnp.tanh(t["embedding"] @ t["kernel_0"] + t["bias_0"]) @ t["kernel_1"] + t["bias_1"]


def prefix(node: Node, dims) -> jax.Array:
    """(layers, 2, heads, P, head_dim): ``Z.reshape(P, L, 2, H, d_h)`` with P moved after the heads."""
    z = flat_prefix(node)
    return z.reshape(z.shape[0], dims.layers, 2, dims.heads, dims.head_dim).transpose(1, 2, 3, 0, 4)


def num_tokens(node: Node) -> int:
    return node.config.num_virtual_tokens


METHOD = base.Method(PrefixTuningConfig, init, scope="model",
                     hooks=base.Hooks(points=("prefix",), num_tokens=num_tokens, prefix=prefix))
