"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al., 2024, "ReFT:
Representation Finetuning for Language Models").

The model is frozen; at the stream leaving each chosen layer (residual site ``"output"``,
pyvene's ``block_output``) and at a few positions of the prompt, the hidden state is edited
inside an ``r``-dimensional subspace:

    h ← h + Rᵀ(W h + b − R h),    R ∈ R^{r×d} with orthonormal rows, W ∈ R^{r×d}, b ∈ R^r,

i.e. the coordinates ``R h`` of ``h`` in the subspace are replaced by ``W h + b`` (pyreft
0.1.0's ``LoreftIntervention.forward``: ``base + (learned_source(base) − rotate_layer(base))
@ rotate_layer.weight.T``, with ``rotate_layer.weight = Rᵀ`` and the linear activation).
With ``dropout`` > 0 training drops entries of the edited state itself, ``dropout(h')``, as
pyreft does (its ``self.dropout(output)``).

Positions (pyreft's ``get_intervention_locations``): ``positions="fF+lL"`` (or ``"fF"``,
``"lL"``) picks the first ``F`` and the last ``L`` tokens of the *prompt*
(``context.prompt_mask``), each count capped at half the prompt, ``min(F, n // 2)`` and
``min(L, n // 2)`` for a prompt of ``n`` tokens, so the two sets never overlap (a one-token
prompt gets no intervention). Positions count prompt tokens only, so left and right padding
and virtual tokens do not move them (pyreft offsets its locations by the left padding in
generation). Where pyreft pads the location lists with a dummy position (a pad token it
prepends, which nothing attends), nothing is edited here. The same positions serve every
chosen layer. With both ``F`` and ``L`` set and ``share_weights=False`` (pyreft's default),
the first and the last positions have interventions of their own at each layer (pyreft's
examples double their layer list); ``share_weights=True`` uses one per layer for both.
Generation (:func:`jpeft.models.phi.generate`) edits the prompt's pass only, as pyreft
generates: later tokens are in no prompt.

Parametrization of ``R`` (stays orthonormal under any gradient step): the trainable
``rotation`` is an unconstrained (r, d) matrix and ``R`` its rows orthonormalized by
Gram–Schmidt (with re-orthogonalization, a short ``fori_loop``: no LAPACK call in the
training step), i.e. the ``Q`` factor of its QR decomposition with a positive diagonal.
pyreft registers ``torch.nn.utils.parametrizations.orthogonal`` on ``Rᵀ`` (d × r), which
for a non-square matrix uses the Householder map with dynamic trivialization: a frozen
random d × d orthogonal base times Householder reflectors of the trainable matrix. That
needs a frozen d × d matrix per intervention (4 M floats at d = 2048); the map here has the
same d·r parameters, the same initial ``R`` and no frozen array, but not the same training
trajectory.

Init (pyreft): ``R`` as ``torch.nn.init.orthogonal_`` draws it, the orthonormalized rows
of a standard normal matrix (Haar-distributed); ``W`` and ``b`` as ``torch.nn.Linear``
draws them, ``U(±1/√d)``. The edit is therefore *not* the identity at init: ``‖Δh‖ =
‖(W − R) h + b‖ ≤ (1 + √r)‖h‖ + √(r/d)`` (the tests pin it).

Defaults: ``rank=4``, ``positions="f1+l1"``, every layer, ``share_weights=False``,
``dropout=0``. Parameters per chosen layer: ``g·(2·r·d + r)`` with ``g = 2`` intervention
sets for ``"fF+lL"`` without shared weights, else 1 (Phi-1.5, d = 2048, 24 layers, the
defaults: 786,624).

Hook point: ``"residual"``, site ``"output"``, positional (:mod:`jpeft.hooks`). Arrays:
``rotation`` and ``weight`` (layers, g, r, d), ``bias`` (layers, g, r), one row of the
leading axis per chosen layer (in increasing layer order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.methods import base
from jpeft.node import Node

Array = jax.Array

_POSITIONS = re.compile(r"^(?:f(\d+))?(\+)?(?:l(\d+))?$")


def parse_positions(positions: str) -> tuple[int, int]:
    """``(F, L)`` of ``"fF+lL"``, ``"fF"`` or ``"lL"`` (pyreft's position strings), each count
    positive; ValueError otherwise."""
    match = _POSITIONS.match(positions) if isinstance(positions, str) else None
    ok = match is not None and (match[1] is not None or match[3] is not None)
    ok = ok and (match[2] is None) == (match[1] is None or match[3] is None)  # "+" exactly between both
    counts = (int(match[1] or 0), int(match[3] or 0)) if ok else (0, 0)
    if not ok or any(match[i] is not None and c == 0 for i, c in ((1, counts[0]), (3, counts[1]))):
        raise ValueError(f"positions must be 'fF+lL', 'fF' or 'lL' with positive counts (the first F and last L "
                         f"tokens of the prompt, as pyreft writes them, e.g. 'f1+l1', 'f7+l7', 'l1'), got {positions!r}")
    return counts


def check_layers(layers, dims) -> None:
    """ValueError unless every index in ``layers`` is a layer of the model."""
    if layers is not None:
        bad = [i for i in layers if i >= dims.layers]
        base.require(not bad, f"layers {bad} are out of range: the model has {dims.layers} layers (0 to {dims.layers - 1})")


def layer_tuple(name: str, layers) -> tuple[int, ...] | None:
    """``layers`` as a sorted tuple of distinct non-negative ints (``None`` stays: every layer)."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    layers = tuple(layers)
    base.require(len(layers) > 0, f"{name} must be None (every layer) or a non-empty list of layer indices")
    for i in layers:
        base.non_negative_int(f"each of {name}", i)
    base.require(len(set(layers)) == len(layers), f"{name} has repeated indices: {list(layers)}")
    return tuple(sorted(layers))


def layer_slot(layers: tuple[int, ...] | None, layer: int) -> int | None:
    """Row of the node's leading axis that holds ``layer`` (``None``: the layer is not chosen)."""
    if layers is None:
        return layer
    return layers.index(layer) if layer in layers else None


@dataclasses.dataclass(frozen=True)
class LoreftConfig:
    """rank: ``r``, the dimension of the edited subspace; layers: the layers whose output
    is edited (``None``: every layer); positions: which prompt tokens ("fF+lL", "fF", "lL");
    share_weights: one intervention per layer for the first and the last positions (pyreft's
    ``--share_weights``); dropout: rate on the edited states in training (pyreft's)."""

    rank: int = 4
    layers: tuple[int, ...] | None = None
    positions: str = "f1+l1"
    share_weights: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        base.positive_int("rank", self.rank)
        object.__setattr__(self, "layers", layer_tuple("layers", self.layers))
        parse_positions(self.positions)
        base.require(isinstance(self.share_weights, bool), f"share_weights must be a bool, got {self.share_weights!r}")
        base.probability("dropout", self.dropout)

    @property
    def groups(self) -> int:
        """Interventions per layer: 2 (first and last positions apart) or 1."""
        first, last = parse_positions(self.positions)
        return 2 if first and last and not self.share_weights else 1

    def check(self, dims) -> None:
        base.require(self.rank < dims.hidden, f"rank={self.rank} must be below the hidden size {dims.hidden} "
                                              "(R projects the stream onto a proper subspace)")
        check_layers(self.layers, dims)


@jax.jit
def orthonormal_rows(m: Array) -> Array:
    """The rows of ``m`` (..., r, d), r ≤ d, orthonormalized in order by Gram–Schmidt with one
    re-orthogonalization pass ("twice is enough"): the ``Q`` factor of ``mᵀ = Q R`` with a
    positive diagonal, transposed. Pure ``jnp`` (a ``fori_loop`` over the rows), differentiable."""
    rows = m.shape[-2]
    index = jnp.arange(rows)

    def step(j, q):
        v = lax.dynamic_index_in_dim(q, j, axis=-2, keepdims=False)
        before = (index < j).astype(q.dtype)  # the rows already orthonormalized
        for _ in range(2):
            coeff = jnp.einsum("...id,...d->...i", q, v) * before
            v = v - jnp.einsum("...i,...id->...d", coeff, q)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        return lax.dynamic_update_index_in_dim(q, v, j, axis=-2)

    return lax.fori_loop(0, rows, step, m)


def intervene(h: Array, r: Array, w: Array, b: Array) -> Array:
    """``h + Rᵀ(W h + b − R h)`` on the last axis of ``h`` (R with orthonormal rows)."""
    return h + (h @ w.T + b - h @ r.T) @ r


def selected_positions(prompt_mask: Array, config: LoreftConfig) -> Array:
    """(g, batch, length) bool: the positions each intervention of a layer edits.

    pyreft's rule on a prompt of ``n`` tokens: the first ``min(F, n // 2)`` and the last
    ``min(L, n // 2)`` tokens of the prompt, counted over ``prompt_mask`` (padding and
    virtual tokens are no prompt tokens)."""
    first_n, last_n = parse_positions(config.positions)
    mask = prompt_mask.astype(bool)
    n = jnp.sum(mask, axis=-1, keepdims=True)
    rank = jnp.cumsum(mask, axis=-1) - 1  # index of each prompt token within its prompt
    first = mask & (rank < jnp.minimum(n // 2, first_n))
    last = mask & (rank >= n - jnp.minimum(n // 2, last_n))
    if config.groups == 2:
        return jnp.stack([first, last])
    return (first | last)[None]


def flat_draw(draw, key: Array, shape: tuple[int, ...], *args) -> Array:
    """``draw(key, shape, *args)`` made as a 1-D draw and reshaped: with jax 0.10 on a CPU a
    random draw of an N-D shape compiles several times slower than the same count in 1-D."""
    return draw(key, (math.prod(shape),), *args).reshape(shape)


@functools.partial(jax.jit, static_argnames=("shape",))
def _draw(key: Array, shape: tuple[int, ...]) -> dict[str, Array]:
    # one compiled program for every draw (an eager init compiles each random op on its own)
    k_rot, k_w, k_b = jax.random.split(key, 3)
    hidden = shape[-1]
    return {
        # torch.nn.init.orthogonal_: the Q factor (positive diagonal) of a standard normal matrix
        "rotation": orthonormal_rows(flat_draw(jax.random.normal, k_rot, shape)),
        "weight": flat_draw(base.kaiming_uniform, k_w, shape, hidden),  # torch.nn.Linear(d, r)
        "bias": flat_draw(base.kaiming_uniform, k_b, shape[:-1], hidden),
    }


def init(key, dims, config: LoreftConfig, params):
    n = dims.layers if config.layers is None else len(config.layers)
    return _draw(key, (n, config.groups, config.rank, dims.hidden)), {}


def rotations(node: Node) -> Array:
    """``R`` of every intervention, (layers, g, r, d), rows orthonormal."""
    return orthonormal_rows(node.trainable["rotation"])


def residual(node: Node, layer: int, site: str, out: Array, inp: Array, context, key: Array | None) -> Array:
    config = node.config
    slot = layer_slot(config.layers, layer)
    if site != "output" or slot is None:
        return out
    where = selected_positions(context.prompt_mask, config)
    r = orthonormal_rows(node.trainable["rotation"][slot])
    w, b = node.trainable["weight"][slot], node.trainable["bias"][slot]
    h = out.astype(jnp.float32)
    edited = h
    for g in range(config.groups):
        new = intervene(h, r[g], w[g], b[g])
        new = base.dropout(new, config.dropout, None if key is None else jax.random.fold_in(key, g))
        edited = jnp.where(where[g][..., None], new, edited)
    return edited.astype(out.dtype)


METHOD = base.Method(LoreftConfig, init, scope="model",
                     hooks=base.Hooks(points=("residual",), residual=residual, uses_key=lambda c: c.dropout > 0,
                                      positional=True))
