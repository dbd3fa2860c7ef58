"""Bottleneck adapters: Houlsby, Pfeiffer and parallel (the ``adapters`` library's
``DoubleSeqBnConfig``, ``SeqBnConfig`` and ``ParBnConfig``).

A bottleneck block with ``r = hidden / reduction_factor`` changes a sublayer output ``o``:

    o' = o + dropout(s · (f(x W_down + b_down) W_up + b_up)),
    W_down ∈ R^{d×r}, b_down ∈ R^r, W_up ∈ R^{r×d}, b_up ∈ R^d,

with ``x = o`` for the sequential kinds and ``x = h``, the sublayer's input, for the
parallel one. That is ``adapters`` 1.3.0's ``Adapter.forward`` and
``ParallelAdapter.forward`` (``adapters/methods/modeling.py``: the scale multiplies the
up-projection's bias too, dropout acts on the scaled output) with their
``pre_forward``/``post_forward`` as ``BottleneckLayer`` runs them on a model hooked through
the library's plugin interface (``adapters/methods/bottleneck.py``, ``init_bottleneck``).

Kinds and their library defaults (each a default here):

* ``"houlsby"`` (``DoubleSeqBnConfig``): sites ``attn`` and ``mlp``, f = swish,
  ``init_weights="bert"``, s = 1, rf 16;
* ``"pfeiffer"`` (``SeqBnConfig``): site ``mlp``, f = relu, ``"bert"``, s = 1, rf 16;
* ``"parallel"`` (``ParBnConfig``): site ``mlp`` reading the MLP's input, f = relu,
  ``"mam_adapter"``, s = 4, rf 2.

(Houlsby et al., ICML 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et
al., EACL 2021, "AdapterFusion"; He et al., ICLR 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning".) ``reduction_factor``, ``non_linearity``,
``init_weights`` and ``scaling`` left at ``None`` take the kind's library default; the
config then holds the values in effect. Note ``ParBnConfig``'s ``reduction_factor`` is 2.

Mapping onto Phi's parallel, pre-LN block ``x + attn(h) + mlp(h)``, ``h = LN(x)``
(hook sites of :mod:`jpeft.hooks`): ``mh_adapter`` is the ``"attn"`` site (the library
hooks the output of ``self_attn.dense``), ``output_adapter`` the ``"mlp"`` site (the
output of ``mlp.fc2``). The options that place the adapter around the *model's* post-LN
(``original_ln_before``, ``original_ln_after``, ``residual_before_ln``) do nothing on Phi:
it has no LayerNorm after its sublayers, and the library's own Phi interface
(``adapters/wrappers/interfaces.py``: ``layer_pre_ffn``, ``layer_ln_1``, ``layer_ln_2``
are ``None``) adds no residual inside the adapter layer (hooked layers force
``original_ln_after=False``; Phi adds the stream itself). So the sequential kinds read the
sublayer output and add it back (``residual_before_ln=True``: the residual is ``o``).
The parallel adapter reads the FFN's input, as in He et al. and as the library gives it
in BERT-style layers; on Phi that is ``h`` (the library's Phi interface registers no
pre-FFN hook, so its ``ParallelAdapter`` would get no input there; its hand-written GPT-J
block passes the un-normalized stream instead). ``ln_before``, ``ln_after``,
``adapter_residual_before_ln``, gating, PHM layers, stochastic depth and ``"learned"``/
``"channel"`` scaling are off in all three configs and not ported; ``layers`` selects
the adapted layers (the library's ``leave_out`` names the others).

Init (``init_weights``, the library's schemes): ``"bert"``, both weights ``N(0, 0.02²)``,
biases 0 (the adapter does not start at zero: its output is small, not nil);
``"mam_adapter"``, ``W_down`` as PyTorch's ``kaiming_uniform_(a=√5)`` (``U(±1/√d)``), ``W_up``
and both biases 0, so the adapted model equals the base at init; ``"houlsby"``,
both weights truncated ``N(0, 0.01²)`` in ±0.02, biases 0. Non-linearities: the
library's names (``transformers``' ``get_activation`` of the lower-cased name, and its
own ``"leakyrelu"``), see :data:`NON_LINEARITIES`.

Parameters: one node ``params["jpeft"]["adapter"]`` whose arrays have a leading axis of
the adapted layers (all of them, or ``layers`` in increasing order) and a site axis
(``"attn"``, ``"mlp"`` as listed): ``down`` (L, S, d, r), ``down_bias`` (L, S, r), ``up``
(L, S, r, d), ``up_bias`` (L, S, d) in float32, computed in the model's compute dtype.
Count: ``L · S · (2·d·r + r + d)``; Phi-1.5 (d = 2048, 24 layers): Pfeiffer at rf 16 (r =
128) 24·(2048·128 + 128 + 128·2048 + 2048) = 12,635,136; Houlsby twice that, 25,270,272;
parallel at its default rf 2 (r = 1024) 24·(2·2048·1024 + 1024 + 2048) = 100,737,024.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node

Array = jax.Array


class Kind(NamedTuple):
    """Where a kind puts its adapters and the defaults of its library config."""

    sites: tuple[str, ...]
    non_linearity: str
    reduction_factor: int
    init_weights: str
    scaling: float
    parallel: bool = False


KINDS = {
    "houlsby": Kind(("attn", "mlp"), "swish", 16, "bert", 1.0),  # DoubleSeqBnConfig
    "pfeiffer": Kind(("mlp",), "relu", 16, "bert", 1.0),  # SeqBnConfig
    "parallel": Kind(("mlp",), "relu", 2, "mam_adapter", 4.0, parallel=True),  # ParBnConfig
}
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


#: The library's non-linearity names (``transformers.activations.get_activation`` of the
#: lower-cased name; ``"leakyrelu"`` is the library's own, ``F.leaky_relu``).
NON_LINEARITIES: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}
PARAMS = ("down", "down_bias", "up", "up_bias")


def resolve(config: Any, **defaults: Any) -> None:
    """Validate the fields a bottleneck config shares (``kind``, ``reduction_factor``,
    ``non_linearity``, ``layers``, ``dropout``, ``init_weights``, ``scaling``) and fill
    those left at ``None`` from ``defaults``, then from the kind's library defaults."""
    base.require(isinstance(config.kind, str) and config.kind in KINDS,
                 f"kind must be one of {sorted(KINDS)}, got {config.kind!r}")
    kind = KINDS[config.kind]
    fill = lambda name: defaults.get(name, getattr(kind, name))  # noqa: E731
    for name in ("reduction_factor", "non_linearity", "init_weights", "scaling"):
        if getattr(config, name) is None:
            object.__setattr__(config, name, fill(name))
    base.positive_int("reduction_factor", config.reduction_factor)
    nl = config.non_linearity
    base.require(isinstance(nl, str) and nl.lower() in NON_LINEARITIES,
                 f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {nl!r}")
    object.__setattr__(config, "non_linearity", nl.lower())
    base.require(config.init_weights in INIT_WEIGHTS,
                 f"init_weights must be one of {INIT_WEIGHTS}, got {config.init_weights!r}")
    scaling = config.scaling
    number = not isinstance(scaling, bool) and isinstance(scaling, (int, float))
    base.require(number and math.isfinite(scaling) and scaling != 0,
                 f"scaling must be a finite non-zero number, got {scaling!r}")
    object.__setattr__(config, "scaling", float(scaling))
    base.probability("dropout", config.dropout)
    if config.layers is not None:
        layers = config.layers
        ok = isinstance(layers, (list, tuple)) and len(layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        base.require(ok, f"layers must be None (every layer) or a non-empty list of layer indices (integers >= 0), "
                         f"got {layers!r}")
        base.require(len(set(layers)) == len(layers), f"layers repeats an index: {layers!r}")
        object.__setattr__(config, "layers", tuple(sorted(layers)))


def check_dims(config: Any, dims) -> None:
    """ValueError unless the reduction factor divides the hidden size and the layers exist."""
    rf = config.reduction_factor
    base.require(dims.hidden % rf == 0, f"reduction_factor={rf} does not divide the model's hidden size {dims.hidden}")
    if config.layers is not None:
        bad = [i for i in config.layers if i >= dims.layers]
        base.require(not bad, f"layers {bad} are out of range: the model has {dims.layers} layers "
                              f"(0 to {dims.layers - 1})")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """kind: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"``; reduction_factor: hidden size
    over the bottleneck width (must divide it); non_linearity: a name of
    :data:`NON_LINEARITIES`; layers: the adapted layer indices (``None``: every layer);
    dropout: rate on the adapter's scaled output in training; init_weights: ``"bert"``,
    ``"mam_adapter"`` or ``"houlsby"``; scaling: ``s``. ``None`` takes the kind's default."""

    kind: str = "pfeiffer"
    reduction_factor: int | None = None
    non_linearity: str | None = None
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0
    init_weights: str | None = None
    scaling: float | None = None

    def __post_init__(self):
        resolve(self)

    def check(self, dims) -> None:
        check_dims(self, dims)

    @property
    def sites(self) -> tuple[str, ...]:
        return KINDS[self.kind].sites


def num_layers(config: Any, dims) -> int:
    return dims.layers if config.layers is None else len(config.layers)


def position(config: Any, layer: int) -> int | None:
    """Index of ``layer`` on the node's layer axis, ``None`` if it is not adapted (static)."""
    if config.layers is None:
        return layer
    return config.layers.index(layer) if layer in config.layers else None


def init_arrays(key: Array, lead: tuple[int, ...], d: int, r: int, init_weights: str) -> dict[str, Array]:
    """``down``, ``down_bias``, ``up``, ``up_bias`` with leading axes ``lead``, each entry
    drawn independently by the library's scheme ``init_weights``."""
    k_down, k_up = jax.random.split(key)
    shapes = {"down": (*lead, d, r), "up": (*lead, r, d)}
    if init_weights == "bert":  # nn.Linear weights normal_(0, 0.02)
        down, up = (0.02 * jax.random.normal(k, shapes[n], jnp.float32) for k, n in ((k_down, "down"), (k_up, "up")))
    elif init_weights == "houlsby":  # trunc_normal_(std=1e-2, a=-2e-2, b=2e-2)
        down, up = (0.01 * jax.random.truncated_normal(k, -2.0, 2.0, shapes[n], jnp.float32)
                    for k, n in ((k_down, "down"), (k_up, "up")))
    else:  # mam_adapter: kaiming_uniform_(a=sqrt(5)) on the (r, d) torch weight (fan_in d), zero up
        down, up = base.kaiming_uniform(k_down, shapes["down"], d), jnp.zeros(shapes["up"], jnp.float32)
    return {"down": down, "down_bias": jnp.zeros((*lead, r), jnp.float32), "up": up,
            "up_bias": jnp.zeros((*lead, d), jnp.float32)}


def init(key, dims, config: AdapterConfig, params):
    lead = (num_layers(config, dims), len(config.sites))
    return init_arrays(key, lead, dims.hidden, dims.hidden // config.reduction_factor, config.init_weights), {}


def block(p: dict[str, Array], out: Array, inp: Array, config: Any, key: Array | None) -> Array:
    """``out + dropout(s · (f(x W_down + b_down) W_up + b_up))`` for one site of one layer
    (``p``: its four arrays), ``x`` being ``inp`` for the parallel kind and ``out`` else;
    in the compute dtype of ``out``."""
    dt = out.dtype
    x = (inp if KINDS[config.kind].parallel else out).astype(dt)
    z = NON_LINEARITIES[config.non_linearity](x @ p["down"].astype(dt) + p["down_bias"].astype(dt))
    up = (z @ p["up"].astype(dt) + p["up_bias"].astype(dt)) * jnp.asarray(config.scaling, dt)
    return out + base.dropout(up, config.dropout, key)


def site_arrays(node: Node, layer: int, site: str) -> dict[str, Array] | None:
    """The arrays of ``site`` in ``layer``, ``None`` where the node has no adapter."""
    pos = position(node.config, layer)
    if pos is None or site not in node.config.sites:
        return None
    s = node.config.sites.index(site)
    return {k: v[pos, s] for k, v in node.trainable.items()}


def residual(node: Node, layer: int, site: str, out: Array, inp: Array, context, key: Array | None) -> Array:
    p = site_arrays(node, layer, site)
    return out if p is None else block(p, out, inp, node.config, key)


def uses_key(config: AdapterConfig) -> bool:
    return config.dropout > 0


METHOD = base.Method(AdapterConfig, init, scope="model",
                     hooks=base.Hooks(points=("residual",), residual=residual, uses_key=uses_key))
