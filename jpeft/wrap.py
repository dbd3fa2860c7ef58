"""``jpeft.wrap``: run any JAX function on trees that hold jpeft nodes.

An unmodified model (a linen ``model.apply``, an NNX ``nnx.merge(graphdef, state)(x)``,
a plain function over dicts of arrays) knows nothing of nodes. :func:`wrap` traces the
function once with each node replaced by an abstract array of its kernel's shape and
dtype, then evaluates the resulting jaxpr itself, equation by equation, with the nodes
in place of those arrays:

* where a node is the weight operand of a matrix product (``dot_general``, which
  ``x @ K``, ``jnp.dot``, ``jnp.matmul``, ``jnp.einsum``, flax's ``Dense``,
  ``DenseGeneral``, ``Einsum``, attention, ``nnx.Linear``/``LinearGeneral``/``Einsum`` all
  issue), contracting exactly the kernel's ``i`` axes (its ``layout``, see
  :func:`jpeft.apply`), the method's factored path runs through :func:`jpeft.linear`, which
  picks factored or materialized by the method's cost model. Layers of a stacked node
  that a batched product (``vmap``) or a ``scan`` consumes run their own adapters;
  indexing a layer out of the stack (``stack[i]``) slices the node, not the base.
* dtype casts keep the node (the product runs in the cast dtype);
* any other use (reshape, arithmetic, a product that contracts the output axes, a
  custom-derivative function) materializes the node there: correct, just not factored;
* a quantized kernel (:func:`jpeft.quantize`) that no method adapts runs as a node with
  nothing to train: dequantized inside :func:`jpeft.linear`'s remat region where it is a
  product's weight, dequantized in place elsewhere.

``jit``, ``remat``, ``scan``, ``cond`` and ``while`` equations are evaluated by the same
rules inside (``jit`` inlined into the caller's trace, the others rebuilt with
``jax.checkpoint``/``lax.scan``/``lax.switch``/``lax.while_loop``), so nodes keep their
factored paths there. The result is an ordinary JAX function: it composes with ``jit``,
``grad``, ``vmap`` around it. Nothing global is patched; the mechanism is the
interpreter pattern of ``jax.core.eval_jaxpr`` (as ``quax`` uses for implicit arrays).

Training key: with ``dropout_key`` the methods that use one in training (dropout; DyLoRA's
rank draw) get it, node ``j`` (in argument order) with ``fold_in(dropout_key, j)`` and each
layer of a stack with its own key; without a key they run in evaluation mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jpeft import core
from jpeft.layout import layer_meta
from jpeft.methods.registry import QUANTIZED, get_method
from jpeft.node import Node, is_leaf, is_node, is_quantized

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Adapted:
    """A node in flight: the node, the dtype the traced program gives its kernel (after
    casts), and its dropout key (``None``: evaluation mode)."""

    node: Node
    dtype: Any
    key: Array | None


def _concrete(value):
    """An array for any value: a node in flight becomes its materialized kernel."""
    if isinstance(value, _Adapted):
        return core.materialize_node(value.node).astype(value.dtype)
    return value


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def wrap(fn: Callable, *, dropout_key: Array | None = None) -> Callable:
    """``fn`` made to accept pytrees with jpeft nodes anywhere in its arguments.

    Args:
      fn: any function of arrays (and static Python values): ``model.apply`` of an
        unmodified linen model, ``lambda state, x: nnx.merge(graphdef, state)(x)``, a
        plain function over dicts of arrays.
      dropout_key: the training key of methods that use one (dropout, DyLoRA's rank draw;
        a distinct key per node and per layer); ``None`` is evaluation mode.

    Returns:
      A function with ``fn``'s signature and results. Array arguments (``jax.Array``,
      NumPy) are traced; other leaves (Python numbers, strings, ``mutable=`` lists) are
      passed to ``fn`` as they are. Nodes run their factored path wherever they are the
      weight of a matrix product and are materialized wherever else they are used.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_leaf)
        added = sorted({x.method for x in leaves if is_node(x) and get_method(x.method).scope == "model"})
        if added:
            raise ValueError(f"jpeft.wrap runs adapted kernels inside unmodified models; {added} add computation at "
                             "hook points (virtual tokens, key/value prefixes, residual sites), which only a model "
                             "implementing jpeft.hooks' protocol runs (jpeft.models.phi does)")
        # a quantized kernel no method adapts runs as a node too: dequantized where it is used
        leaves = [core.fit_meta(x) if is_node(x) else core.quantized_node(x) if is_quantized(x) else x for x in leaves]
        dynamic = [i for i, x in enumerate(leaves) if is_node(x) or _is_array(x)]
        if not any(is_node(leaves[i]) for i in dynamic):
            return fn(*args, **kwargs)

        def flat_fn(*values):
            filled = list(leaves)
            for i, v in zip(dynamic, values):
                filled[i] = v
            a, k = jax.tree_util.tree_unflatten(treedef, filled)
            return fn(*a, **k)

        def abstract(x):
            shape = x.kernel_shape if is_node(x) else np.shape(x)
            return jax.ShapeDtypeStruct(shape, x.dtype if is_node(x) else jnp.result_type(x))

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*[abstract(leaves[i]) for i in dynamic])
        values, count = [], 0
        for i in dynamic:
            x = leaves[i]
            if is_node(x) and x.method == QUANTIZED:
                values.append(_Adapted(x, x.dtype, None))
            elif is_node(x):
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, count)
                values.append(_Adapted(x, x.dtype, key))
                count += 1
            else:
                values.append(x)
        outs = evaluate(closed.jaxpr, closed.consts, values)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), [_concrete(o) for o in outs])

    return wrapped


def evaluate(jaxpr: jcore.Jaxpr, consts, args) -> list:
    """``jax.core.eval_jaxpr`` with nodes in flight: equations that receive one go to a
    rule of :data:`RULES` (default: materialize it and bind the primitive)."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(v, value):
        if not isinstance(v, jcore.DropVar):
            env[v] = value

    for v, x in zip(jaxpr.constvars, consts):
        write(v, x)
    for v, x in zip(jaxpr.invars, args):
        write(v, x)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, _Adapted) for x in invals):
            outs = RULES.get(eqn.primitive, _materialize_rule)(eqn, invals)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
            write(v, x)
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _materialize_rule(eqn, invals):
    return _bind(eqn, [_concrete(x) for x in invals])


# --- products: the factored path ---------------------------------------------------


def _layer_keys(key: Array | None, stack: tuple[int, ...]):
    if key is None or not stack:
        return key
    return jax.random.split(key, math.prod(stack)).reshape(stack)


def _dot_general_rule(eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, _Adapted) == isinstance(rhs, _Adapted):
        return _materialize_rule(eqn, invals)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    node_is_rhs = isinstance(rhs, _Adapted)
    a, x = (rhs, lhs) if node_is_rhs else (lhs, rhs)
    (xc, nc), (xb, nb) = ((lc, rc), (lb, rb)) if node_is_rhs else ((rc, lc), (rb, lb))
    node, layout = a.node, a.node.layout
    depth = len(node.stack_shape)
    in_axes = [d for d, c in enumerate(layout) if c == "i"]
    if not layout or sorted(nc) != in_axes or sorted(nb) != list(range(depth)):
        return _materialize_rule(eqn, invals)  # not the product its layer computes
    x_batch = [xa for _, xa in sorted(zip(nb, xb))]
    x_contract = [xa for _, xa in sorted(zip(nc, xc))]
    x_free = [d for d in range(x.ndim) if d not in x_batch and d not in x_contract]
    order = x_batch + x_free + x_contract
    x = x if order == list(range(x.ndim)) else jnp.transpose(x, order)
    free_shape = tuple(x.shape[depth : depth + len(x_free)])
    n, m = node.shape
    x = x.reshape(node.stack_shape + (math.prod(free_shape), n)).astype(jnp.result_type(x.dtype, a.dtype))
    cast = node.replace(dtype=a.dtype)
    keys = _layer_keys(a.key, node.stack_shape)
    if keys is None:
        y = core.map_layers(lambda layer, xl: core.linear(xl, layer), cast, x)
    else:
        y = core.map_layers(lambda layer, xl, k: core.linear(xl, layer, dropout_key=k), cast, x, keys)
    out_dims = tuple(d for d, c in zip(node.kernel_shape, layout) if c == "o")
    y = y.reshape(node.stack_shape + free_shape + out_dims)
    if not node_is_rhs:  # dot_general puts the lhs' free axes (the node's outputs) first
        s, f, o = depth, len(free_shape), len(out_dims)
        y = jnp.transpose(y, list(range(s)) + list(range(s + f, s + f + o)) + list(range(s, s + f)))
    return y.astype(eqn.outvars[0].aval.dtype)


def _convert_rule(eqn, invals):
    (a,) = invals
    new = eqn.params["new_dtype"]
    if jnp.issubdtype(new, jnp.floating):
        return dataclasses.replace(a, dtype=np.dtype(new))
    return _materialize_rule(eqn, invals)


# --- layers out of a stack ---------------------------------------------------------


def _slice_layers(a: _Adapted, index_fn, kept: tuple[int, ...], depth_removed: int, key_index) -> _Adapted:
    """``a`` with ``index_fn`` applied to every array of its node (which only touches
    the stacked axes), ``kept`` the new stack sizes and ``depth_removed`` axes dropped."""
    node = a.node
    sliced = jax.tree_util.tree_map(index_fn, node)
    new_shape = kept + node.kernel_shape[len(node.stack_shape) :]
    layout = node.layout[depth_removed:]
    sliced = sliced.replace(layout=layout, kernel_shape=new_shape)
    key = None if a.key is None else jax.random.fold_in(a.key, key_index)
    return _Adapted(sliced, a.dtype, key)


def _only_stack_axes(a: _Adapted, starts, sizes) -> bool:
    depth = len(a.node.stack_shape)
    rest = a.node.kernel_shape[depth:]
    return depth > 0 and all(s == 0 for s in starts[depth:]) and tuple(sizes[depth:]) == rest


def _slice_rule(eqn, invals):
    a = invals[0]
    p = eqn.params
    start, limit = p["start_indices"], p["limit_indices"]
    if p["strides"] not in (None, (1,) * len(start)) or not _only_stack_axes(a, start, np.subtract(limit, start)):
        return _materialize_rule(eqn, invals)
    depth = len(a.node.stack_shape)
    index = tuple(slice(s, l) for s, l in zip(start[:depth], limit[:depth]))
    kept = tuple(l - s for s, l in zip(start[:depth], limit[:depth]))
    return _slice_layers(a, lambda leaf: leaf[index], kept, 0, int(np.ravel_multi_index(start[:depth], a.node.stack_shape)))


def _dynamic_slice_rule(eqn, invals):
    a, *starts = invals
    sizes = eqn.params["slice_sizes"]
    depth = len(a.node.stack_shape)
    concrete_rest = all(isinstance(v, jcore.Literal) for v in eqn.invars[1 + depth :])
    if not concrete_rest or not _only_stack_axes(a, [0] * depth + [v.val for v in eqn.invars[1 + depth :]], sizes):
        return _materialize_rule(eqn, invals)
    index = starts[:depth]
    kept = tuple(sizes[:depth])

    def take(leaf):
        return lax.dynamic_slice(leaf, list(index) + [0] * (leaf.ndim - depth), kept + leaf.shape[depth:])

    flat_index = index[0] if depth == 1 else jnp.ravel_multi_index(tuple(index), a.node.stack_shape, mode="clip")
    return _slice_layers(a, take, kept, 0, flat_index)


def _squeeze_rule(eqn, invals):
    (a,) = invals
    dims = tuple(sorted(eqn.params["dimensions"]))
    depth = len(a.node.stack_shape)
    if dims != tuple(range(len(dims))) or len(dims) > depth:
        return _materialize_rule(eqn, invals)
    kept = a.node.stack_shape[len(dims) :]
    return _slice_layers(a, lambda leaf: leaf.reshape(leaf.shape[len(dims) :]), kept, len(dims), 0)


# --- control flow: evaluate the bodies with the same rules ---------------------------


def _flatten_values(values, scan_length: int | None = None):
    """Arrays for a list that may hold nodes in flight, and the function that rebuilds the
    list from those arrays. With ``scan_length``, the arrays are a scan's ``xs`` and the
    rebuilt nodes are one layer of each stack (with one dropout key per layer)."""
    flat, plan = [], []
    for v in values:
        if not isinstance(v, _Adapted):
            plan.append(None)
            flat.append(v)
            continue
        leaves = jax.tree_util.tree_leaves(v.node)
        meta = v.node if scan_length is None else layer_meta(v.node)
        key = v.key if v.key is None or scan_length is None else jax.random.split(v.key, scan_length)
        plan.append((len(leaves), jax.tree_util.tree_structure(meta), v.dtype, key is not None))
        flat += leaves + ([key] if key is not None else [])

    def rebuild(arrays):
        out, at = [], 0
        for step in plan:
            if step is None:
                out.append(arrays[at])
                at += 1
                continue
            count, treedef, dtype, has_key = step
            node = jax.tree_util.tree_unflatten(treedef, list(arrays[at : at + count]))
            out.append(_Adapted(node, dtype, arrays[at + count] if has_key else None))
            at += count + has_key
        return out

    return flat, rebuild


def _jit_rule(eqn, invals):
    inner = eqn.params["jaxpr"]
    return evaluate(inner.jaxpr, inner.consts, invals)


def _remat_rule(eqn, invals):
    flat, rebuild = _flatten_values(invals)
    body = lambda *arrays: [_concrete(o) for o in evaluate(eqn.params["jaxpr"], (), rebuild(list(arrays)))]
    return jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])(*flat)


def _scan_rule(eqn, invals):
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts = invals[:n_consts]
    carry = [_concrete(v) for v in invals[n_consts : n_consts + n_carry]]
    # a node scanned over its leading stacked axis gives one layer per step; otherwise it is materialized
    stacked = lambda v: isinstance(v, _Adapted) and v.node.stack_shape[:1] == (length,)
    xs = [v if stacked(v) else _concrete(v) for v in invals[n_consts + n_carry :]]
    flat_xs, rebuild_xs = _flatten_values(xs, scan_length=length)
    inner = p["jaxpr"]

    def body(carry, sliced):
        outs = evaluate(inner.jaxpr, inner.consts, list(consts) + list(carry) + rebuild_xs(sliced))
        outs = [_concrete(o) for o in outs]
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(body, carry, flat_xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return list(carry_out) + list(ys)


def _cond_rule(eqn, invals):
    index, *ops = invals
    branches = [
        functools.partial(lambda br: [_concrete(o) for o in evaluate(br.jaxpr, br.consts, ops)], br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(_concrete(index), branches)


def _while_rule(eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc : nc + nb]
    init = [_concrete(v) for v in invals[nc + nb :]]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    cond = lambda c: _concrete(evaluate(cj.jaxpr, cj.consts, list(cond_consts) + list(c))[0])
    body = lambda c: [_concrete(o) for o in evaluate(bj.jaxpr, bj.consts, list(body_consts) + list(c))]
    return lax.while_loop(cond, body, init)


#: Rules for equations that receive a node in flight, by primitive.
RULES: dict[Any, Callable] = {
    P.dot_general_p: _dot_general_rule,
    P.convert_element_type_p: _convert_rule,
    P.slice_p: _slice_rule,
    P.dynamic_slice_p: _dynamic_slice_rule,
    P.squeeze_p: _squeeze_rule,
    P.jit_p: _jit_rule,
    P.remat_p: _remat_rule,
    P.scan_p: _scan_rule,
    P.cond_p: _cond_rule,
    P.while_p: _while_rule,
}
