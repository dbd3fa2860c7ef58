"""What every method module provides, and the validation helpers they share.

A method is a :class:`Method` record of plain functions (the optax style): a frozen
config dataclass that validates its hyper-parameters, ``init`` that builds the trainable
and frozen arrays from the original kernel, ``materialize`` that rebuilds the full
weight, ``factored`` that applies the adapted layer to activations without forming the
weight, and ``flops``, the cost model that picks between the two (``experiments/PERF.md``, "Cost model").

Orientation: a Flax kernel ``K`` is (in, out) and computes ``y = x @ K``; the thesis
writes the weight as ``M = Kᵀ`` (out × in), so its left factors act on outputs.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.node import Node

Array = jax.Array


class Method(NamedTuple):
    """A PEFT method as pure functions.

    Attributes:
      config: frozen dataclass of hyper-parameters; its ``__post_init__`` rejects bad
        values and its ``check(shape)`` rejects values that do not fit a kernel shape.
      init: ``(key, kernel, config) -> (trainable, frozen)`` dicts of arrays.
      materialize: ``node -> W'`` (in, out) in float32.
      factored: ``(x, node, dropout_key | None) -> x @ W'`` without forming ``W'``.
      flops: ``(node, tokens) -> (factored, materialized)`` estimated FLOP of one
        training step (forward + backward) of the layer on ``tokens`` rows.
      scope: ``"kernel"`` (the targeted kernels become nodes), ``"bias"`` (the
        targeted layers' biases become fully trainable and their kernels stay plain: BitFit)
        or ``"model"`` (a method that adds computation at the model's hook points,
        :mod:`jpeft.hooks`: one node under ``params["jpeft"][name]``, run by the model
        through ``hooks``; ``init`` is then ``(key, dims, config, params) -> (trainable,
        frozen)`` with the model's :class:`jpeft.hooks.ModelDims` and the base parameters,
        the config's ``check(dims)`` refuses values the model cannot take, and
        ``materialize``, ``factored``, ``flops`` are unused).
      frozen_from_base: ``(kernel, config) -> frozen``, the frozen arrays of ``init``
        that can be recomputed from the base kernel alone (no key): :func:`base_kernel`
        for methods that keep just the base, SHOFT's and SVFT's float64 SVD. Adapter
        exports then store none of these arrays, only their vectors (singular values) to
        check the base they are loaded onto, and loading rebuilds them; frozen vectors it
        does not give (SVFT's key-drawn positions) are stored. ``None`` (RHOFT, whose
        randomized SVD depends on the key): the frozen arrays other than ``kernel`` are
        stored in the adapter.
      shared: ``(key, layers, config) -> shared``, for a method whose targets share
        arrays (VeRA's random projections): called once per ``jpeft.apply``, with
        ``fold_in(key, SHARED_KEY)`` of the apply key and ``layers``, one
        ``jax.ShapeDtypeStruct`` per target with its layer's (in, out) matrix shape and
        the kernel's dtype; ``init`` then takes the result as a fourth argument,
        ``init(key, kernel, config, shared)``, for every layer, and may put its arrays
        (the same objects) in several nodes. ``None``: ``init`` takes three arguments.
      uses_key: ``config -> bool``, whether a node needs a key in training (the
        ``dropout_key`` of ``factored``), e.g. DyLoRA's per-step rank draw; ``None``:
        when its config has a ``dropout`` above 0. Models pass a key only to such nodes
        (:func:`jpeft.core.uses_dropout`), and ``jpeft.linear`` then takes the factored path.
      with_rank: ``(config, rank) -> config``, for a method with an evaluation rank
        (DyLoRA): the config evaluating at ``rank`` (ValueError if it does not fit);
        ``jpeft.materialize(tree, rank=...)`` and :func:`jpeft.core.with_rank` use it.
      training: :class:`Training` hooks for a method that needs more than the gradient
        step (AdaLoRA's regularizer and rank budget); ``jpeft.train`` runs them.
      hooks: :class:`Hooks`, what a ``"model"``-scope method computes at the hook points.

    A frozen entry named ``kernel`` must be the base kernel itself: ``jpeft.apply``
    stores the model's own array there (any layout, a whole stack, never a copy). One named
    ``residual`` is a base-shaped remainder that replaces it (PiSSA's, OLoRA's): over a
    quantized base (``jpeft.quantize``) it is stored quantized like the base.
    """

    config: type
    init: Callable[..., tuple[dict, dict]]
    materialize: Callable[[Node], Array] | None = None
    factored: Callable[[Array, Node, Array | None], Array] | None = None
    flops: Callable[[Node, int], tuple[float, float]] | None = None
    scope: str = "kernel"
    frozen_from_base: Callable[[Array, Any], dict] | None = None
    shared: Callable[[Array, list, Any], Any] | None = None
    uses_key: Callable[[Any], bool] | None = None
    with_rank: Callable[[Any, int], Any] | None = None
    training: "Training | None" = None
    hooks: "Hooks | None" = None


class Training(NamedTuple):
    """Training hooks of a method that needs more than the gradient step (``jpeft.train``):

    prepare: ``(adapted, total_steps) -> adapted``, run-dependent hyper-parameters filled in;
    init: ``trainable -> state``, an explicit pytree of arrays, checkpointed with the run;
    regularizer: ``trainable -> scalar`` added to the (token-mean) loss of every step;
    after_step: ``(state, trainable, grads, step) -> (trainable, state)`` after the optimizer
      update of step ``step`` (1-based), with that step's gradients (regularizer included);
    metrics: ``(state, trainable) -> {name: scalar}`` logged as ``<method>_<name>``.
    """

    prepare: Callable[[Any, int], Any]
    init: Callable[[Any], Any]
    regularizer: Callable[[Any], Array]
    after_step: Callable[[Any, Any, Any, Array], tuple[Any, Any]]
    metrics: Callable[[Any, Any], dict]


class Hooks(NamedTuple):
    """What a method that adds computation runs at a model's hook points (:mod:`jpeft.hooks`).

    points: the hook points it uses (of ``jpeft.hooks.POINTS``);
    num_tokens: ``node -> P``, the virtual tokens or prefix positions it adds (static);
    embeddings: ``node -> (P, hidden)`` virtual-token embeddings (``"embeddings"``);
    prefix: ``(node, dims) -> (layers, 2, heads, P, head_dim)`` keys and values (``"prefix"``);
    residual: ``(node, layer, site, out, inp, context, key) -> out'`` at each site of each
      layer (``"residual"``; the identity at the sites and layers it does not use);
    uses_key: ``config -> bool``, whether it draws randomness in training (dropout, routing);
    merged: ``node -> node``, its inference form where that is cheaper (AdaMix's averaged
      experts: one adapter), which ``jpeft.materialize`` returns; ``None``: the node itself;
    positional: whether its residual hook depends on positions within the prompt
      (``context.prompt_mask``: LoReFT), so a cached pass must say whether it starts the sequence.
    """

    points: tuple[str, ...]
    num_tokens: Callable[[Node], int] | None = None
    embeddings: Callable[[Node], Array] | None = None
    prefix: Callable[[Node, Any], Array] | None = None
    residual: Callable[..., Array] | None = None
    uses_key: Callable[[Any], bool] | None = None
    merged: Callable[[Node], Node] | None = None
    positional: bool = False


#: What ``jpeft.apply`` folds into its key for :attr:`Method.shared` (target ``i`` gets
#: ``fold_in(key, i)``; no model has 2**32 - 1 targets).
SHARED_KEY = 2**32 - 1


def base_kernel(kernel: Array, config: Any) -> dict:
    """``frozen_from_base`` of a method whose only frozen array is the base kernel itself."""
    return {"kernel": kernel}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout on ``x``; the identity without a key (evaluation) or at rate 0.

    The mask is drawn flat and reshaped (the same bits as a draw of ``x.shape``): with jax
    0.10 on a CPU an N-D draw compiles several times slower than the same count in 1-D."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.size,)).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dense_step_flops(node: Node, tokens: int) -> float:
    """FLOP of ``x @ W`` in a training step when ``W`` itself needs a gradient.

    Forward ``x W``, backward ``dy Wᵀ`` and the weight gradient ``xᵀ dy``: 3 × 2·T·n·m.
    """
    n, m = node.shape
    return 6.0 * tokens * n * m


def low_rank_flops(node: Node, tokens: int, r: int) -> tuple[float, float]:
    """``(factored, materialized)`` step FLOP of a frozen kernel plus a rank-``r`` update
    ``s·(x a) b`` (LoRA and its variants): the adapter's forward and two backward products
    ``6·T·r·(in + out)``, against the dense step plus the rebuild ``a b`` and its two
    backward products ``6·in·r·out``."""
    n, m = node.shape
    adapter = 6.0 * tokens * r * (n + m)
    rebuild = 3 * 2.0 * n * r * m
    return frozen_step_flops(node, tokens) + adapter, dense_step_flops(node, tokens) + rebuild


def frozen_step_flops(node: Node, tokens: int) -> float:
    """FLOP of ``x @ W`` with a frozen ``W``: forward and backward to activations only."""
    n, m = node.shape
    return 4.0 * tokens * n * m


def kaiming_uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
