"""GaLore: full-parameter training with optimizer states in a low-rank gradient subspace.

Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024 (Algorithm 1), as an optax
``GradientTransformation``; :func:`galore_adamw` reproduces the reference implementation,
``GaLoreAdamW`` of galore-torch 1.0 with ``proj_type="std"``.

For a selected matrix leaf with gradient ``G_t`` (``m × n``) and ``t = count`` the number of
updates done before this one (0, 1, 2, ...):

* **Projector refresh**, when ``t % update_proj_gap == 0`` (so on the first update too):
  ``U, S, Vᵀ = svd(G_t)`` in float32, thin. If ``m >= n`` (tall or square) the projector is
  ``Q = Vᵀ[:r, :]`` (``r × n``, the top right singular vectors as rows); if ``m < n`` it is
  ``P = U[:, :r]`` (``m × r``, the top left singular vectors), ``r = min(rank, m, n)``.
  The projector is stored in the gradient's dtype (as galore-torch casts it back).
* **Projection**: ``R_t = G_t Qᵀ`` (``m × r``) or ``R_t = Pᵀ G_t`` (``r × n``).
* **Inner step** on ``R_t`` (default: the Adam of galore-torch, :func:`scale_by_hf_adam`):
  ``M_t = β₁ M + (1-β₁) R_t``, ``V_t = β₂ V + (1-β₂) R_t²``,
  ``N_t = sqrt(1-β₂ᵗ⁺¹)/(1-β₁ᵗ⁺¹) · M_t / (sqrt(V_t) + ε)``.
  The moments are **not** reset when the projector changes (galore-torch 1.0 keeps them
  across refreshes, although they were accumulated in the previous subspace's coordinates).
* **Back-projection and scale**: ``ΔW = scale · N_t Q`` or ``ΔW = scale · P N_t``.
* With a learning rate ``η`` (``galore(learning_rate=...)`` / :func:`galore_adamw`) the
  parameter update is galore-torch's: ``W' = W - η ΔW`` and then, if ``weight_decay = λ > 0``,
  ``W'' = W' - η λ W'`` (decoupled decay applied *after* the step, to the updated weight; this
  is not ``optax.add_decayed_weights``, which decays the old weight: the two differ by
  ``η² λ ΔW``).

Leaves that are not projected (vectors, small or unselected matrices) get the inner
transformation on their full gradient, and the same learning rate and weight decay.

**Signs of singular vectors.** Singular vectors are defined up to sign, and LAPACK libraries
choose differently (torch's MKL and jaxlib's CPU LAPACK disagree on about half of them).
Within one projector period ``P N_t`` does not depend on the choice (a flip of column ``i``
of ``P`` flips row ``i`` of every ``R``, hence of ``M``, hence of ``N``, and ``P N`` is
unchanged). Across a refresh it does: the moments carried over from the previous period are
combined with gradients projected on the new basis, so flipping a vector of the new basis
relative to the old one changes the trajectory. galore-torch therefore follows whatever its
SVD backend returns. Here the signs are fixed by a convention, so the trajectory does not
depend on the backend: each kept singular vector (the column of ``P``, the row of ``Q``) is
flipped so that its entry of largest magnitude is positive (the first such entry on ties).

**Memory.** For an ``m × n`` matrix with ``m < n`` the state is the projector ``m × r`` and
Adam's two moments ``2 · r × n``; with ``m >= n`` it is ``r × n`` and ``2 · m × r``: in both
cases ``r · (min(m, n) + 2 · max(m, n))`` numbers instead of Adam's ``2 · m · n``.
Unprojected leaves keep Adam's ``2 ·`` size. :func:`state_bytes` gives the exact total from
shapes alone.

Everything is a pure function: the state is ``GaLoreState(count, projectors, inner_state)``
(arrays only; unprojected leaves hold ``optax.MaskedNode()`` in ``projectors``), the refresh
is a ``jax.lax.cond`` inside ``update`` (one thin SVD per selected matrix, each its own call),
and ``update`` can be jitted.

Usage::

    tx = jpeft.optim.galore_adamw(1e-3, rank=128, update_proj_gap=200, scale=0.25)
    tx = optax.chain(jpeft.optim.galore(rank=128, inner=optax.scale_by_adam()),
                     optax.scale_by_learning_rate(1e-3))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
Mask = Union[PyTree, Callable[[PyTree], PyTree], None]

__all__ = [
    "GaLoreState",
    "ScaleByHfAdamState",
    "galore",
    "galore_adamw",
    "projected_leaves",
    "scale_by_hf_adam",
    "state_bytes",
]


# --------------------------------------------------------------------------- the inner Adam


class ScaleByHfAdamState(NamedTuple):
    """State of :func:`scale_by_hf_adam`: the update count and the two moments."""

    count: Array  # int32 scalar, updates done so far
    mu: PyTree
    nu: PyTree


def _check_betas_eps(b1: float, b2: float, eps: float) -> None:
    for name, b in (("b1", b1), ("b2", b2)):
        if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {b!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _one_minus_power(b: float, t: Array) -> Array:
    """``1 - b**t`` in float32 without the cancellation of ``1 - b**t`` (``b = 0.999`` loses
    about 1e-5 relative at ``t = 1`` that way): ``-expm1(t · log b)``, ``log b`` in double."""
    if b == 0.0:
        return jnp.ones((), jnp.float32)  # 0**t = 0 for t >= 1
    return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(math.log(b)))


def scale_by_hf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, *,
                     correct_bias: bool = True) -> optax.GradientTransformation:
    """The Adam direction of galore-torch 1.0's ``GaLoreAdamW`` (copied from transformers'
    ``AdamW``), without the learning rate.

    With ``t`` the 1-based update number::

        m_t = β₁ m + (1 - β₁) g          v_t = β₂ v + (1 - β₂) g²
        u_t = sqrt(1 - β₂ᵗ) / (1 - β₁ᵗ) · m_t / (sqrt(v_t) + ε)      (factor 1 if not correct_bias)

    ``ε`` is added to ``sqrt(v_t)`` *before* bias correction; ``optax.scale_by_adam`` adds it
    after (``m̂ / (sqrt(v̂) + ε)``), which equals this with ``ε`` replaced by
    ``ε · sqrt(1 - β₂ᵗ)``. Defaults are galore-torch's (``betas=(0.9, 0.999), eps=1e-6``).
    The output is the descent direction (positive); chain a learning rate after it. The
    moments have the updates' dtype; the state is ``ScaleByHfAdamState(count, mu, nu)``.
    """
    _check_betas_eps(b1, b2, eps)

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p))
        return ScaleByHfAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree_util.tree_map(zeros, params),
            nu=jax.tree_util.tree_map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: m * b1 + g * (1.0 - b1), state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: v * b2 + g * g * (1.0 - b2), state.nu, updates)
        if correct_bias:
            factor = jnp.sqrt(_one_minus_power(b2, count)) / _one_minus_power(b1, count)
        else:
            factor = jnp.ones((), jnp.float32)

        def direction(m, v):
            return (factor * (m / (jnp.sqrt(v) + eps))).astype(m.dtype)

        return jax.tree_util.tree_map(direction, mu, nu), ScaleByHfAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- selection


def _check_rank_gap(rank, update_proj_gap) -> None:
    for name, value in (("rank", rank), ("update_proj_gap", update_proj_gap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _mask_leaves(mask: Mask, tree: PyTree, treedef, what: str) -> list[bool] | None:
    """The mask's leaves (Python bools) in ``tree``'s flatten order, or None for no mask."""
    if mask is None:
        return None
    m = mask(tree) if callable(mask) else mask
    try:
        leaves = treedef.flatten_up_to(m)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} must have the parameters' tree structure {treedef}: {e}") from None
    out = []
    for leaf in leaves:
        if not isinstance(leaf, (bool, np.bool_)):
            raise ValueError(f"{what} leaves must be Python bools, got {leaf!r}")
        out.append(bool(leaf))
    return out


def _plan(tree: PyTree, rank: int, mask: Mask) -> tuple[list, Any, list[tuple[str, int] | None]]:
    """For each leaf of ``tree`` (arrays or shape-dtype structs): ``None`` (not projected) or
    ``(side, r)``: ``side`` ``"right"`` (``m >= n``: ``R = G Qᵀ``) or ``"left"`` (``m < n``:
    ``R = Pᵀ G``), ``r = min(rank, m, n)``."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    selected = _mask_leaves(mask, tree, treedef, "mask")
    plan = []
    for i, (path, leaf) in enumerate(with_path):
        shape = tuple(jnp.shape(leaf))
        if selected is None:
            on = len(shape) == 2 and min(shape) > rank
        else:
            on = selected[i]
            if on and len(shape) != 2:
                raise ValueError(
                    f"mask selects {jax.tree_util.keystr(path)} with shape {shape} for GaLore, "
                    "but only 2-D arrays (matrices) can be projected")
        if on:
            m, n = shape
            plan.append(("right" if m >= n else "left", min(rank, m, n)))
        else:
            plan.append(None)
    return [leaf for _, leaf in with_path], treedef, plan


def projected_leaves(params: PyTree, rank: int = 128, *, mask: Mask = None) -> PyTree:
    """Which leaves :func:`galore` projects (a tree of bools like ``params``): with no
    ``mask``, the 2-D leaves with ``min(shape) > rank``; else the mask's selection (which
    must select only 2-D leaves)."""
    _check_rank_gap(rank, 1)
    _, treedef, plan = _plan(params, rank, mask)
    return treedef.unflatten([p is not None for p in plan])


# --------------------------------------------------------------------------- GaLore


class GaLoreState(NamedTuple):
    """State of :func:`galore`.

    ``count``: int32 scalar, updates done so far (the refresh happens when
    ``count % update_proj_gap == 0``, and a learning-rate schedule is evaluated at it).
    ``projectors``: like the parameters; a projected ``m × n`` leaf holds ``Q`` (``r × n``)
    if ``m >= n``, ``P`` (``m × r``) if ``m < n``; other leaves hold ``optax.MaskedNode()``.
    ``inner_state``: the inner transformation's state over the projected gradients
    (``m × r`` / ``r × n`` for projected leaves, the full shape for the others).
    """

    count: Array
    projectors: PyTree
    inner_state: PyTree


def _projector(g: Array, side: str, r: int, dtype) -> Array:
    """The refreshed projector of gradient ``g``: thin float32 SVD, top ``r`` vectors on the
    ``side``, signs fixed (largest-magnitude entry positive), cast to ``dtype``."""
    u, _, vt = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    if side == "right":
        q = vt[:r, :]  # r × n
        pivot = jnp.take_along_axis(q, jnp.argmax(jnp.abs(q), axis=1)[:, None], axis=1)
        q = q * jnp.where(pivot < 0, -1.0, 1.0).astype(q.dtype)
    else:
        q = u[:, :r]  # m × r
        pivot = jnp.take_along_axis(q, jnp.argmax(jnp.abs(q), axis=0)[None, :], axis=0)
        q = q * jnp.where(pivot < 0, -1.0, 1.0).astype(q.dtype)
    return q.astype(dtype)


def _project(g: Array, proj: Array, side: str) -> Array:
    return g @ proj.T if side == "right" else proj.T @ g


def _project_back(n: Array, proj: Array, side: str) -> Array:
    return n @ proj if side == "right" else proj @ n


def _projector_shape(shape, spec) -> tuple[int, int]:
    """``Q``: ``r × n`` (``side == "right"``), ``P``: ``m × r`` (``"left"``)."""
    side, r = spec
    return (r, shape[1]) if side == "right" else (shape[0], r)


def _projected_zeros(leaf, spec) -> Array:
    """Zeros shaped like the inner transformation's input for this leaf: ``m × r`` (right),
    ``r × n`` (left), the leaf's own shape if not projected."""
    shape, dtype = tuple(jnp.shape(leaf)), jnp.result_type(leaf)
    if spec is not None:
        side, r = spec
        shape = (shape[0], r) if side == "right" else (r, shape[1])
    return jnp.zeros(shape, dtype)


def galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, *,
           inner: optax.GradientTransformation | None = None,
           learning_rate: optax.ScalarOrSchedule | None = None,
           weight_decay: float = 0.0,
           mask: Mask = None,
           weight_decay_mask: Mask = None) -> optax.GradientTransformation:
    """GaLore (Zhao et al., ICML 2024, Algorithm 1) around an inner transformation.

    For each selected matrix gradient ``G`` (``m × n``), with ``t = count`` the number of
    earlier updates: at ``t % update_proj_gap == 0`` the projector is refreshed from the thin
    float32 SVD of ``G`` (``Q = Vᵀ[:r]``, ``r × n``, if ``m >= n``; ``P = U[:, :r]``, ``m × r``,
    if ``m < n``; ``r = min(rank, m, n)``; signs fixed as in the module docstring); then
    ``R = G Qᵀ`` or ``R = Pᵀ G``, ``N = inner(R)`` (the inner state lives in the projected
    shape and is not reset at a refresh), and the output is ``scale · N Q`` or ``scale · P N``.
    Unselected leaves get ``inner`` on the full gradient (no projection, no ``scale``).

    Args:
      rank: the projection rank ``r`` (an integer >= 1).
      update_proj_gap: refresh the projectors every this many updates (integer >= 1).
      scale: the GaLore scale ``α`` multiplying the back-projected update (finite, > 0).
      inner: the transformation run in the projected space. Default
        :func:`scale_by_hf_adam` with galore-torch's defaults (``β = (0.9, 0.999)``,
        ``ε = 1e-6``). It receives ``params=None`` (there are no parameters in the projected
        space), so it must not need them (put weight decay in ``weight_decay`` instead).
      learning_rate: None: the output is the direction ``ΔW`` above; chain a learning rate
        (``optax.scale_by_learning_rate``) or use an ``inner`` that includes one. A float, a
        scalar array (so ``optax.inject_hyperparams`` works, with the other arguments in its
        ``static_args``) or an optax schedule (evaluated at ``count``): the output is
        galore-torch's full update ``-η ΔW``, with weight decay below.
      weight_decay: ``λ >= 0``, galore-torch's decoupled decay after the step,
        ``W'' = W' - η λ W'`` with ``W' = W - η ΔW``; needs ``learning_rate`` and ``params``
        in ``update``.
      mask: which leaves to project: a tree of Python bools like the parameters, or a
        callable from the parameters (in ``init``) / updates (in ``update``) to one; it must
        depend on structure and shapes only. Default: every 2-D leaf with
        ``min(shape) > rank``. A selected leaf that is not 2-D is a ``ValueError``.
      weight_decay_mask: which leaves ``weight_decay`` applies to (same forms as ``mask``);
        default all (galore-torch decays every parameter of a group with ``weight_decay``).

    Memory of the state for a projected ``m × n`` leaf with Adam as ``inner``:
    ``r · (min(m, n) + 2 · max(m, n))`` numbers instead of ``2 · m · n`` (see
    :func:`state_bytes`).
    """
    _check_rank_gap(rank, update_proj_gap)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if weight_decay > 0 and learning_rate is None:
        raise ValueError(
            f"weight_decay={weight_decay!r} needs learning_rate (galore-torch's decay is "
            "W' <- W' - learning_rate * weight_decay * W'); with learning_rate=None chain "
            "optax.add_decayed_weights yourself")
    if learning_rate is not None and not callable(learning_rate):
        # a scalar array (optax.inject_hyperparams passes one, maybe traced) is taken as is
        is_array = isinstance(learning_rate, (jax.Array, np.ndarray)) and np.ndim(learning_rate) == 0
        if not is_array and (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
                             or not (math.isfinite(learning_rate) and learning_rate >= 0)):
            raise ValueError(f"learning_rate must be a finite number >= 0, a scalar array or a schedule, "
                             f"got {learning_rate!r}")
    if inner is None:
        inner = scale_by_hf_adam()
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")

    def init_fn(params):
        leaves, treedef, plan = _plan(params, rank, mask)
        _mask_leaves(weight_decay_mask, params, treedef, "weight_decay_mask")  # fail early
        projectors = [optax.MaskedNode() if spec is None
                      else jnp.zeros(_projector_shape(jnp.shape(leaf), spec), jnp.result_type(leaf))
                      for leaf, spec in zip(leaves, plan)]
        low = treedef.unflatten([_projected_zeros(leaf, spec) for leaf, spec in zip(leaves, plan)])
        return GaLoreState(
            count=jnp.zeros((), jnp.int32),
            projectors=treedef.unflatten(projectors),
            inner_state=inner.init(low),
        )

    def update_fn(updates, state, params=None):
        leaves, treedef, plan = _plan(updates, rank, mask)
        old = treedef.flatten_up_to(state.projectors)
        idx = [i for i, spec in enumerate(plan) if spec is not None]
        for i in idx:
            want = _projector_shape(leaves[i].shape, plan[i])
            if isinstance(old[i], optax.MaskedNode) or tuple(old[i].shape) != want:
                raise ValueError(f"state.projectors leaf {i} does not fit the update of shape "
                                 f"{tuple(leaves[i].shape)}: was the state made by this transformation's init?")

        def refresh(grads):
            return [_projector(g, plan[i][0], plan[i][1], old[i].dtype) for i, g in zip(idx, grads)]

        def keep(grads):
            del grads
            return [old[i] for i in idx]

        due = state.count % update_proj_gap == 0
        if not idx:
            fresh = []
        elif isinstance(due, jax.core.Tracer):  # under jit (the usual case): one cond, SVDs in one branch
            fresh = jax.lax.cond(due, refresh, keep, [leaves[i] for i in idx])
        else:  # eager: the count is known, skip compiling a cond at every call
            fresh = (refresh if bool(due) else keep)([leaves[i] for i in idx])
        proj = list(old)
        for i, p in zip(idx, fresh):
            proj[i] = p

        low = [g if spec is None else _project(g, proj[i], spec[0]) for i, (g, spec) in enumerate(zip(leaves, plan))]
        low_out, inner_state = inner.update(treedef.unflatten(low), state.inner_state, None)
        low_out = treedef.flatten_up_to(low_out)
        out = []
        for i, (g, n, spec) in enumerate(zip(leaves, low_out, plan)):
            u = n if spec is None else _project_back(n, proj[i], spec[0]) * scale
            out.append(u.astype(g.dtype))

        if learning_rate is not None:
            lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
            out = [(-lr * u).astype(u.dtype) for u in out]
            if weight_decay > 0:
                if params is None:
                    raise ValueError("galore with weight_decay > 0 needs params in update(updates, state, params)")
                p_leaves = treedef.flatten_up_to(params)
                decay = _mask_leaves(weight_decay_mask, params, treedef, "weight_decay_mask") or [True] * len(out)
                # W' = W + u, then W'' = W' - lr·λ·W', i.e. update u - lr·λ·(W + u)
                out = [(u - (lr * weight_decay) * (p + u)).astype(u.dtype) if d else u
                       for u, p, d in zip(out, p_leaves, decay)]

        new_state = GaLoreState(
            count=optax.safe_int32_increment(state.count),
            projectors=treedef.unflatten(proj),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(learning_rate: optax.ScalarOrSchedule = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-6, *, correct_bias: bool = True, mask: Mask = None,
                 weight_decay_mask: Mask = None) -> optax.GradientTransformation:
    """galore-torch 1.0's ``GaLoreAdamW`` (``proj_type="std"``) as one optax transformation.

    Per update, for a projected leaf (``m × n``, ``t`` earlier updates, refresh and
    orientation as in :func:`galore`)::

        R = Pᵀ G  (m < n)   or   R = G Qᵀ  (m >= n)
        M = β₁ M + (1 - β₁) R,   V = β₂ V + (1 - β₂) R²            (never reset)
        N = sqrt(1 - β₂ᵗ⁺¹) / (1 - β₁ᵗ⁺¹) · M / (sqrt(V) + ε)
        W' = W - η · scale · (P N  or  N Q)
        W'' = W' - η λ W'                                           (if λ = weight_decay > 0)

    Unprojected leaves: the same with ``R = G`` and no ``scale``. The same as
    ``galore(rank, update_proj_gap, scale, inner=scale_by_hf_adam(b1, b2, eps),
    learning_rate=learning_rate, weight_decay=weight_decay, mask=mask)``; galore-torch's
    defaults are ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0`` (its ``scale``
    has no default in ``GaLoreAdamW``; the paper uses 0.25).
    """
    return galore(rank, update_proj_gap, scale,
                  inner=scale_by_hf_adam(b1, b2, eps, correct_bias=correct_bias),
                  learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
                  weight_decay_mask=weight_decay_mask)


def state_bytes(params_or_shapes: PyTree, rank: int = 128, *,
                inner: optax.GradientTransformation | None = None, mask: Mask = None) -> int:
    """Bytes of :func:`galore`'s state for these parameters, from shapes alone.

    ``params_or_shapes`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape`` of a model's init); nothing is allocated (the state's shapes come from
    ``jax.eval_shape`` of ``init``). With Adam as ``inner`` this is, in the parameters'
    dtype, ``Σ_projected r·(min(m, n) + 2·max(m, n)) + Σ_others 2·size`` numbers plus the two
    int32 counters (GaLore's and Adam's). For plain Adam's state on the same tree pass a
    ``mask`` selecting nothing (that adds GaLore's counter, 4 bytes), or use
    ``jax.eval_shape(optax.adam(1e-3).init, shapes)``.
    """
    tx = galore(rank, 1, 1.0, inner=inner, mask=mask)
    shapes = jax.eval_shape(tx.init, params_or_shapes)
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes)))
