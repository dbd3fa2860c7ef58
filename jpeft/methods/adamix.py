"""AdaMix: a mixture of bottleneck adapters (Wang et al., EMNLP 2022, "AdaMix:
Mixture-of-Adaptations for Parameter-efficient Model Tuning").

Each adapter site holds ``E = num_experts`` down projections ``(W_down^i, b_down^i)`` and
``E`` up projections ``(W_up^j, b_up^j)``. In training every forward pass of a site picks
one down and one up expert, independently and uniformly at random (stochastic routing),

    o' = o + dropout(s · (f(x W_down^i + b_down^i) W_up^j + b_up^j)),   i, j ~ U{0..E-1},

with ``x``, ``s``, ``f`` and the placement of the bottleneck adapter (:mod:`jpeft.methods.adapter`,
``kind``; default ``"pfeiffer"``: one adapter on the MLP output, where the official code
puts its ``ExpertSoup``; the paper's figure draws Houlsby adapters, ``kind="houlsby"``). In evaluation the experts are merged, ``W = mean_i W^i`` and
``b = mean_i b^i`` for the down and the up projections ("adaptation merging"), so
inference costs one adapter: :attr:`jpeft.methods.base.Hooks.merged` turns the node into an ``adapter``
node with the averaged arrays (what ``jpeft.materialize`` returns), and the path without
a key (evaluation) computes the same averaged adapter.

From the official code (github.com/microsoft/AdaMix, ``src/transformers/models/expert_soup.py``,
``MixtureSoup``/``ExpertSoup``): the route is drawn by ``torch.randint`` once per call
of each projection, so per forward pass, per layer and per site, the whole batch
taking the same experts; here the draw comes from the training key the model gives the
hook (one per pass, layer and site), so a key fixes the routes. Merging is its
``inference_level=3`` (``softmax`` of a frozen all-zero score: the plain mean, biases
included). ``share_down``/``share_up`` are its ``sharing_down``/``sharing_up`` (one
projection instead of ``E``; the README's GLUE command shares the up projection). Its
adapters use GELU (``get_activation("gelu")``, the exact one), hence the default
``non_linearity="gelu"`` (the kind's library default otherwise applies to
``init_weights``, ``scaling``, ``reduction_factor``: ``"bert"``, 1, 16 for Pfeiffer; the
official code also draws ``N(0, 0.02²)`` weights and zero biases through BERT's init).

Not included: the consistency regularizer. In training the official models run a second
stochastic forward pass and add the symmetric KL divergence of the two predictions
(:func:`consistency_loss`, weight 1 for GLUE, 100 for its GPT-2 NLG runs); that needs two
forward passes per step, which a method's ``Training.regularizer`` (a function of the
trainable arrays only) cannot express, so ``jpeft.train`` does not add it. The
function is here for a loss that does.

Parameters: one node ``params["jpeft"]["adamix"]``, arrays as the adapter's with an
expert axis after the site axis: ``down`` (L, S, E_d, d, r), ``down_bias`` (L, S, E_d, r),
``up`` (L, S, E_u, r, d), ``up_bias`` (L, S, E_u, d), ``E_d = 1`` with ``share_down``
(``E_u`` likewise). Count ``L · S · (E_d·(d·r + r) + E_u·(r·d + d))``: E times the adapter
without sharing; Phi-1.5, Pfeiffer placement, rf 16, E = 4: 4 × 12,635,136 = 50,540,544
trained, 12,635,136 at inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import adapter, base
from jpeft.node import Node

Array = jax.Array
#: the official code's activation (``ExpertSoup(..., 'gelu', ...)``)
NON_LINEARITY = "gelu"


@dataclasses.dataclass(frozen=True)
class AdaMixConfig:
    """num_experts: ``E``, the down and up projections per site; share_down, share_up:
    one projection of that side instead of ``E``; the other fields as
    :class:`jpeft.methods.adapter.AdapterConfig` (``non_linearity`` defaults to GELU)."""

    num_experts: int = 4
    kind: str = "pfeiffer"
    reduction_factor: int | None = None
    non_linearity: str | None = None
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0
    init_weights: str | None = None
    scaling: float | None = None
    share_down: bool = False
    share_up: bool = False

    def __post_init__(self):
        base.positive_int("num_experts", self.num_experts)
        for name in ("share_down", "share_up"):
            value = getattr(self, name)
            base.require(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        adapter.resolve(self, non_linearity=NON_LINEARITY)

    def check(self, dims) -> None:
        adapter.check_dims(self, dims)

    @property
    def sites(self) -> tuple[str, ...]:
        return adapter.KINDS[self.kind].sites

    @property
    def experts(self) -> dict[str, int]:
        """How many projections each side has: ``{"down": E_d, "up": E_u}``."""
        return {"down": 1 if self.share_down else self.num_experts, "up": 1 if self.share_up else self.num_experts}

    def adapter_config(self) -> adapter.AdapterConfig:
        """The config of the single adapter that the merged experts form."""
        return adapter.AdapterConfig(kind=self.kind, reduction_factor=self.reduction_factor,
                                     non_linearity=self.non_linearity, layers=self.layers, dropout=self.dropout,
                                     init_weights=self.init_weights, scaling=self.scaling)


def init(key, dims, config: AdaMixConfig, params):
    lead = (adapter.num_layers(config, dims), len(config.sites))
    d, r = dims.hidden, dims.hidden // config.reduction_factor
    k_down, k_up = jax.random.split(key)
    # every expert of both sides drawn independently (the official code re-initializes each copy)
    down = adapter.init_arrays(k_down, (*lead, config.experts["down"]), d, r, config.init_weights)
    up = adapter.init_arrays(k_up, (*lead, config.experts["up"]), d, r, config.init_weights)
    return {"down": down["down"], "down_bias": down["down_bias"], "up": up["up"], "up_bias": up["up_bias"]}, {}


def _side(name: str) -> str:
    return "down" if name.startswith("down") else "up"


def merge(arrays: dict[str, Array]) -> dict[str, Array]:
    """The experts averaged: each array's expert axis (third from the front for a whole
    node, first for one site) meaned away."""
    axis = 2 if arrays["down"].ndim == 5 else 0
    return {k: jnp.mean(v, axis=axis) for k, v in arrays.items()}


def route(key: Array, experts: dict[str, int]) -> dict[str, Array]:
    """The expert index of each side for one pass of one site (a scalar each; 0 if shared)."""
    keys = dict(zip(("down", "up"), jax.random.split(key)))
    return {side: jax.random.randint(keys[side], (), 0, n) if n > 1 else jnp.zeros((), jnp.int32)
            for side, n in experts.items()}


def residual(node: Node, layer: int, site: str, out: Array, inp: Array, context, key: Array | None) -> Array:
    p = adapter.site_arrays(node, layer, site)  # each (E, ...)
    if p is None:
        return out
    if key is None:  # evaluation: the merged adapter
        return adapter.block(merge(p), out, inp, node.config, None)
    k_route, k_drop = jax.random.split(key)
    chosen = route(k_route, node.config.experts)
    # a dynamic index of one expert: its gradient lands in that expert's slot only
    p = {k: v[chosen[_side(k)]] for k, v in p.items()}
    return adapter.block(p, out, inp, node.config, k_drop)


def merged(node: Node) -> Node:
    """The ``adapter`` node of the averaged experts (AdaMix's inference form)."""
    return Node("adapter", node.config.adapter_config(), node.shape, node.dtype, merge(node.trainable), {},
                layout=node.layout, kernel_shape=node.kernel_shape)


def uses_key(config: AdaMixConfig) -> bool:
    return (config.num_experts > 1 and not (config.share_down and config.share_up)) or config.dropout > 0


def consistency_loss(logits_a: Array, logits_b: Array, mask: Array | None = None) -> Array:
    """The official code's consistency term between two stochastic passes: the symmetric
    KL divergence ``½ (KL(p_b ‖ p_a) + KL(p_a ‖ p_b))`` of the softmax predictions, each
    target held constant (``stop_gradient``, its ``detach``), averaged over the rows
    (``reduction="batchmean"``): the leading axis of (batch, classes) logits, or the
    positions where ``mask`` is true for (batch, length, vocab) language-model logits, as
    its NLG code. Float32; multiply by the weight (1 in its GLUE runs, 100 in NLG)."""
    a, b = (jnp.asarray(x, jnp.float32) for x in (logits_a, logits_b))
    log_a, log_b = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
    kl = lambda log_p, log_q: jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)  # noqa: E731  KL(q || p) per row
    per_row = kl(log_a, jax.lax.stop_gradient(log_b)) + kl(log_b, jax.lax.stop_gradient(log_a))
    if mask is None:
        return 0.5 * jnp.sum(per_row) / per_row.shape[0]
    mask = jnp.asarray(mask, bool)
    base.require(mask.shape == per_row.shape, f"mask must have shape {per_row.shape}, got {mask.shape}")
    return 0.5 * jnp.sum(jnp.where(mask, per_row, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


METHOD = base.Method(AdaMixConfig, init, scope="model",
                     hooks=base.Hooks(points=("residual",), residual=residual, uses_key=uses_key, merged=merged))
