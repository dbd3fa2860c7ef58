"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

Like prompt tuning, P virtual-token embeddings are prepended to the token embeddings,
``[V; embed(x)]``, and the model is frozen; but ``V`` is the output of a small trainable
*prompt encoder* over a trainable table ``E ∈ R^{P×d}`` (``d`` the model's hidden size,
``e`` the encoder's), which couples the virtual tokens during training:

    mlp:   V = relu(relu(E W₁ + b₁) W₂ + b₂) W₃ + b₃,        W₁: d×e, W₂: e×e, W₃: e×d
    lstm:  V = relu(H U₁ + c₁) U₂ + c₂,  H = BiLSTM_n(E) (P × 2e),  U₁: 2e×2e, U₂: 2e×d

``BiLSTM_n`` is ``n`` stacked bidirectional LSTM layers (torch's ``nn.LSTM(d, e, n,
bidirectional=True)``: each layer runs the sequence forwards and backwards from zero
states and concatenates the two ``e``-wide outputs; layer ``l > 0`` reads the 2e-wide
output of layer ``l - 1``). One direction, gates in torch's order ``i, f, g, o``:

    [i f g o] = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh
    c_t = σ(f) c_{t-1} + σ(i) tanh(g),   h_t = σ(o) tanh(c_t)

The virtual tokens take the first P positions; the model returns the logits of the real
tokens only (PEFT returns all P + T; its last T are the same numbers).

HF PEFT (0.21, ``PromptEncoderConfig``, ``peft/tuners/p_tuning/model.py``):
``encoder_reparameterization_type`` ``"MLP"`` (default) or ``"LSTM"`` is ``encoder``;
``encoder_hidden_size`` defaults to the model's hidden size; ``encoder_num_layers``
(default 2) is the LSTM's depth (PEFT's MLP ignores it with a warning: here a value other
than 2 with the MLP is refused); ``encoder_dropout`` (default 0, between LSTM layers) has no
counterpart. Arrays and PEFT's tensors: ``embedding`` = ``embedding.weight``;
``mlp_{k}_kernel``/``mlp_{k}_bias`` = ``mlp_head.{2k}.weight``ᵀ/``.bias``;
``lstm_{l}_w_ih[0]`` = ``lstm_head.weight_ih_l{l}``ᵀ and ``[1]`` = ``weight_ih_l{l}_reverse``ᵀ,
likewise ``w_hh``, ``b_ih``, ``b_hh`` (direction 0 forwards, 1 backwards).

Init (PEFT's, i.e. torch's defaults): ``E ~ N(0, 1)`` (``nn.Embedding``); each Linear's
weight and bias ``U(±1/√fan_in)`` (``nn.Linear``: ``kaiming_uniform_(a=√5)``); every LSTM
weight and bias ``U(±1/√e)`` (``nn.LSTM``).

Hook point: ``"embeddings"`` (:mod:`jpeft.hooks`). Parameters:

    mlp:   P·d + (d·e + e) + (e·e + e) + (e·d + d)
    lstm:  P·d + Σ_l 2·(4e·(in_l + e) + 8e) + (2e·2e + 2e) + (2e·d + d),  in_0 = d, in_l = 2e

Phi-1.5 (d = e = 2048) at P = 20: 12,630,016 (MLP); 193,050,624 (LSTM, n = 2).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.methods.prompt_tuning import check_virtual_tokens
from jpeft.node import Node

ENCODERS = ("mlp", "lstm")
#: PEFT's ``encoder_num_layers`` default, the only depth its MLP has
DEFAULT_LAYERS = 2


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
    """num_virtual_tokens: P; encoder: ``"mlp"`` or ``"lstm"`` (PEFT's
    ``encoder_reparameterization_type``); encoder_hidden_size: e (``None``: the model's
    hidden size, as PEFT); encoder_num_layers: the LSTM's stacked bidirectional layers."""

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = DEFAULT_LAYERS

    def __post_init__(self):
        base.positive_int("num_virtual_tokens", self.num_virtual_tokens)
        base.require(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None:
            base.positive_int("encoder_hidden_size", self.encoder_hidden_size)
        base.positive_int("encoder_num_layers", self.encoder_num_layers)
        base.require(self.encoder == "lstm" or self.encoder_num_layers == DEFAULT_LAYERS,
                     f"encoder_num_layers={self.encoder_num_layers} applies to the LSTM encoder only; the MLP "
                     f"encoder has exactly 3 linear layers (PEFT ignores the value)")

    def check(self, dims) -> None:
        check_virtual_tokens(self.num_virtual_tokens, dims)


def _width(config: PTuningConfig, dims) -> int:
    return config.encoder_hidden_size or dims.hidden


def _linear_specs(sizes) -> list[tuple[str, tuple[int, ...], int]]:
    """``mlp_{k}_kernel`` (in, out) and ``mlp_{k}_bias`` of a chain of Linear layers, with their fan-in."""
    specs = []
    for k, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        specs += [(f"mlp_{k}_kernel", (n, m), n), (f"mlp_{k}_bias", (m,), n)]
    return specs


def _lstm_specs(d: int, e: int, layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """Each layer's arrays, both directions stacked on a leading axis of 2 (fan-in e: ``nn.LSTM``'s ``U(±1/√e)``)."""
    specs = []
    for l in range(layers):
        inp = d if l == 0 else 2 * e
        specs += [(f"lstm_{l}_w_ih", (2, inp, 4 * e), e), (f"lstm_{l}_w_hh", (2, e, 4 * e), e),
                  (f"lstm_{l}_b_ih", (2, 4 * e), e), (f"lstm_{l}_b_hh", (2, 4 * e), e)]
    return specs


@functools.partial(jax.jit, static_argnums=(1, 2))
def torch_init(key, embedding: tuple[int, int], uniform: tuple[tuple[str, tuple[int, ...], int], ...]) -> dict:
    """torch's default inits: ``embedding`` of that shape ``N(0, 1)`` (``nn.Embedding``) and
    each ``(name, shape, fan_in)`` of ``uniform`` ``U(±1/√fan_in)`` (``nn.Linear``'s weight and
    bias, ``nn.LSTM``'s arrays with fan-in its hidden size).

    One program with one uniform draw split among the arrays: eager draws would compile
    one random-number program per array shape (a dozen for the LSTM encoder)."""
    k_emb, k_uniform = jax.random.split(key)
    out = {"embedding": jax.random.normal(k_emb, embedding, jnp.float32)}
    if uniform:
        sizes = [math.prod(shape) for _, shape, _ in uniform]
        flat = base.kaiming_uniform(k_uniform, (sum(sizes),), 1)  # U(-1, 1), scaled per array
        for (name, shape, fan_in), part in zip(uniform, jnp.split(flat, list(itertools.accumulate(sizes))[:-1])):
            out[name] = part.reshape(shape) / math.sqrt(fan_in)
    return out


def init(key, dims, config: PTuningConfig, params):
    d, e, p = dims.hidden, _width(config, dims), config.num_virtual_tokens
    if config.encoder == "mlp":
        specs = _linear_specs((d, e, e, d))
    else:
        specs = _lstm_specs(d, e, config.encoder_num_layers) + _linear_specs((2 * e, 2 * e, d))
    return torch_init(key, (p, d), tuple(specs)), {}


def bilstm_layer(x: jax.Array, w_ih, w_hh, b_ih, b_hh) -> jax.Array:
    """One bidirectional LSTM layer over ``x`` (P, in) from zero states: (P, 2e), row ``t``
    the forward and the backward output at ``t`` (torch's). The arrays have a leading
    direction axis (0 forwards, 1 backwards); gates in torch's order ``i, f, g, o``. Both
    directions run in one scan, the backward one over the reversed sequence."""
    e = w_hh.shape[1]
    xs = jnp.stack([x, x[::-1]])  # (2, P, in): each direction's sequence in its reading order
    gates_in = jnp.einsum("dpi,dig->pdg", xs, w_ih) + (b_ih + b_hh)  # the input part of every step at once

    def step(carry, z_in):
        h, c = carry  # (2, e) each
        i, f, g, o = jnp.split(z_in + jnp.einsum("de,deg->dg", h, w_hh), 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((2, e), x.dtype)
    hs = jax.lax.scan(step, (zeros, zeros), gates_in)[1]  # (P, 2, e), in reading order
    return jnp.concatenate([hs[:, 0], hs[::-1, 1]], axis=-1)


def bilstm(x: jax.Array, t: dict, layers: int) -> jax.Array:
    """torch's ``nn.LSTM(bidirectional=True, num_layers=layers)`` output for one sequence (P, in) -> (P, 2e)."""
    for l in range(layers):
        x = bilstm_layer(x, *(t[f"lstm_{l}_{n}"] for n in ("w_ih", "w_hh", "b_ih", "b_hh")))
    return x


def _mlp(x: jax.Array, t: dict, n: int) -> jax.Array:
    for k in range(n):
        x = x @ t[f"mlp_{k}_kernel"] + t[f"mlp_{k}_bias"]
        x = jax.nn.relu(x) if k < n - 1 else x
    return x


def embeddings(node: Node) -> jax.Array:
    t, config = node.trainable, node.config
    if config.encoder == "mlp":
        return _mlp(t["embedding"], t, 3)
    return _mlp(bilstm(t["embedding"], t, config.encoder_num_layers), t, 2)


def num_tokens(node: Node) -> int:
    return node.config.num_virtual_tokens


METHOD = base.Method(PTuningConfig, init, scope="model",
                     hooks=base.Hooks(points=("embeddings",), num_tokens=num_tokens, embeddings=embeddings))
