"""The hook protocol: how a model runs the methods that add computation.

Most jpeft methods reparametrize kernels the model already has. Some add computation
instead (prompt, P- and prefix tuning, bottleneck adapters, AdaMix, PaSTA, LoReFT); a
model runs them at three kinds of *hook points*, without jpeft editing its code:

``"embeddings"``
    Virtual-token embeddings (batch, P, hidden) prepended to the token embeddings
    (prompt tuning, P-tuning). The model extends its attention mask by P attended
    positions, numbers positions over the P + T sequence, and returns logits of the T
    real tokens only. With a key/value cache the virtual tokens are written on the pass
    that starts the sequence (``start=True``) and occupy the first P cache slots.
``"prefix"``
    Per-layer key/value prefixes, each (batch, heads, P, head_dim), attended by every
    position, not rotated (prefix tuning). Token positions count them (the first token is
    at position P), as transformers numbers positions after a ``past_key_values`` prefix.
``"residual"``
    A function of the residual stream at a site of each layer, ``out -> out'``, given the
    sublayer input: ``"input"`` (the stream entering the layer), ``"attn"`` (the attention
    output before it joins the stream), ``"mlp"`` (the MLP output before it joins) and
    ``"output"`` (the stream leaving the layer); adapters, AdaMix, PaSTA, LoReFT.

:func:`jpeft.apply` puts the node of such a method (a :class:`jpeft.Node` whose arrays
hold every layer's parameters) in the parameter tree under the top-level key
:data:`KEY` (``params["jpeft"][method]``), so ``partition``/``combine``/``count_params``,
checkpoints and adapter exports treat it like any other node; it needs the model's
:class:`ModelDims` (``apply(params, "prefix_tuning", key=k, model=model)`` with a model
that has ``jpeft_dims()``, or the dims themselves). A model implements the protocol by

1. ``jpeft_dims()`` returning its :class:`ModelDims`, ``points`` naming the hook points it
   runs (a method whose point is missing is refused by ``apply``);
2. taking the hook nodes out of its parameters with :func:`split`;
3. calling :func:`virtual_embeddings`, :func:`prefix_kv` and :func:`residual` at the
   points above, with a :class:`Context` of the pass (token ids, the prompt mask).

Both ports (``jpeft.models.phi``, ``jpeft.models.llama``, through ``jpeft.models.layers``)
implement all of them; see ``layers.CausalLM`` for a complete example.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.methods.registry import get_method
from jpeft.node import Node, is_node

Array = jax.Array
PyTree = Any

#: the top-level key of a parameter tree under which the hook nodes live
KEY = "jpeft"
POINTS = ("embeddings", "prefix", "residual")
SITES = ("input", "attn", "mlp", "output")
#: hook points that at most one method of a tree may use (their outputs do not compose)
EXCLUSIVE_POINTS = ("embeddings", "prefix")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What a method that adds computation needs to know of the model (static, hashable).

    Attributes:
      hidden: width of the residual stream.
      layers: number of decoder layers.
      heads: attention heads (key/value heads: prefixes have this many).
      head_dim: width of one head.
      max_positions: the longest sequence the model takes, virtual tokens and prefixes included.
      vocab_size: rows of the token embedding.
      embedding: '/'-joined path of the (vocab, hidden) token embedding in the parameters
        (prompt tuning's ``init="text"`` copies rows of it).
      points: the hook points the model runs (a subset of :data:`POINTS`).
      special_token_ids: the tokenizer's special tokens the model knows of (PaSTA's default).
    """

    hidden: int
    layers: int
    heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    embedding: str
    points: tuple[str, ...] = POINTS
    special_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        unknown = sorted(set(self.points) - set(POINTS))
        if unknown:
            raise ValueError(f"ModelDims.points has unknown hook points {unknown}; valid: {list(POINTS)}")


class Context(NamedTuple):
    """What a residual hook may look at besides the stream: the pass's token ids
    (batch, length; -1 at virtual tokens; ``None`` when the model got embeddings),
    ``prompt_mask`` (batch, length), true on the tokens of the prompt in this pass (LoReFT
    intervenes at positions counted within it), and ``attention_mask`` (batch, length),
    false on padding (``None``: every position is a token)."""

    input_ids: Array | None
    prompt_mask: Array
    attention_mask: Array | None = None


def dims_of(model: Any) -> ModelDims:
    """``model`` itself if it is a :class:`ModelDims`, else ``model.jpeft_dims()``."""
    if isinstance(model, ModelDims):
        return model
    get = getattr(model, "jpeft_dims", None)
    if get is None:
        raise TypeError(
            f"model must be a jpeft.hooks.ModelDims or a model implementing the hook protocol (a jpeft_dims() "
            f"method, as jpeft.models.phi.PhiForCausalLM has), got {type(model).__name__}"
        )
    return get()


def split(params: PyTree) -> tuple[PyTree, dict[str, Node]]:
    """``(params without the hook nodes, {method: node})``."""
    if not isinstance(params, Mapping) or KEY not in params:
        return params, {}
    rest = {k: v for k, v in params.items() if k != KEY}
    hooks = dict(params[KEY])
    bad = [k for k, v in hooks.items() if not is_node(v) or _spec(v) is None]
    if bad:
        raise ValueError(f"params[{KEY!r}] holds the nodes of methods that add computation; {bad} are not such nodes")
    return rest, hooks


def _spec(node: Node):
    return get_method(node.method).hooks


def _using(hooks: Mapping[str, Node], point: str) -> list[Node]:
    return [n for n in hooks.values() if point in _spec(n).points]


def num_virtual_tokens(hooks: Mapping[str, Node]) -> int:
    """P of the virtual tokens the hook nodes prepend (0 without any); static."""
    return sum(_spec(n).num_tokens(n) for n in _using(hooks, "embeddings"))


def num_prefix_tokens(hooks: Mapping[str, Node]) -> int:
    """P of the key/value prefixes the hook nodes give every layer (0 without any); static."""
    return sum(_spec(n).num_tokens(n) for n in _using(hooks, "prefix"))


def virtual_embeddings(hooks: Mapping[str, Node], batch: int, dtype: Any) -> Array | None:
    """The (batch, P, hidden) virtual-token embeddings to prepend, or ``None``."""
    nodes = _using(hooks, "embeddings")
    if not nodes:
        return None
    (node,) = nodes
    x = _spec(node).embeddings(node)
    return jnp.broadcast_to(x.astype(dtype), (batch, *x.shape))


def prefix_kv(hooks: Mapping[str, Node], batch: int, dims: ModelDims, dtype: Any) -> list[tuple[Array, Array]] | None:
    """One ``(key, value)`` per layer, each (batch, heads, P, head_dim), or ``None``."""
    nodes = _using(hooks, "prefix")
    if not nodes:
        return None
    (node,) = nodes
    kv = _spec(node).prefix(node, dims).astype(dtype)  # (layers, 2, heads, P, head_dim)
    return [tuple(jnp.broadcast_to(x, (batch, *x.shape)) for x in layer) for layer in kv]


def residual(hooks: Mapping[str, Node], layer: int, site: str, out: Array, inp: Array, context: Context,
             key: Array | None) -> Array:
    """``out`` after every residual hook of ``site`` in ``layer`` (in method-name order).

    ``inp`` is the sublayer's input (the normalized stream for ``"attn"``/``"mlp"``, the
    stream entering the layer for ``"output"``, ``out`` itself for ``"input"``); ``key``
    the training key (``None``: evaluation), folded per method.
    """
    for i, (name, node) in enumerate(sorted(hooks.items())):
        spec = _spec(node)
        if "residual" in spec.points:
            k = None if key is None else jax.random.fold_in(key, i)
            out = spec.residual(node, layer, site, out, inp, context, k)
    return out


def needs_start(hooks: Mapping[str, Node]) -> bool:
    """Whether a cached pass must say if it starts the sequence: virtual tokens are
    written then, and position-based interventions (LoReFT) count prompt positions."""
    return any("embeddings" in _spec(n).points or _spec(n).positional for n in hooks.values())


def uses_key(hooks: Mapping[str, Node]) -> bool:
    """Whether a hook node draws randomness in training (adapter dropout, AdaMix's routing)."""
    return any(_spec(n).uses_key(n.config) for n in hooks.values() if _spec(n).uses_key is not None)
