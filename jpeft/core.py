"""The functional API: apply, materialize, partition/combine, count_params, linear.

``apply`` walks a parameter pytree, and replaces each kernel whose '/'-joined path
matches a target pattern by a :class:`jpeft.node.Node` of the chosen method; every other
leaf is untouched. All functions here are pure and compose with ``jit``, ``grad``,
``vmap`` and ``jax.eval_shape``.

What they build on sits below this module: paths and targets in :mod:`jpeft.tree`, kernel
layouts in :mod:`jpeft.layout`, the method registry in :mod:`jpeft.methods.registry`,
quantized kernels in :mod:`jpeft.quantized`, the hook protocol in :mod:`jpeft.hooks`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import hooks
from jpeft.layout import from_matrix, layer_meta, matrix_shape, per_layer, resolve_layout, stack_depth, to_matrix
from jpeft.methods.base import SHARED_KEY, Method
from jpeft.methods.registry import QUANTIZED, get_method, make_config, methods
from jpeft.node import Node, Quantized, is_leaf, is_node, is_quantized
from jpeft.quantized import dequantized, holds_quantized, plain_kernel, quantized_like
from jpeft.tree import leaves_with_paths, match_targets, path_str

Array = jax.Array
PyTree = Any

PATHS = ("auto", "factored", "materialized")


@functools.lru_cache(maxsize=None)
def _layer_leaf_ndims(method: str, config, shape: tuple[int, int], dtype) -> tuple[int, ...]:
    """The ranks of one layer's arrays, in tree order (from shapes only)."""
    spec = get_method(method)

    def init():
        key, kernel = jax.random.key(0), jnp.zeros(shape, dtype)
        if spec.shared is None:
            return spec.init(key, kernel, config)
        return spec.init(key, kernel, config, spec.shared(key, [jax.ShapeDtypeStruct(shape, dtype)], config))

    return tuple(x.ndim for x in jax.tree_util.tree_leaves(jax.eval_shape(init)))


def fit_meta(node: Node) -> Node:
    """``node`` with its static description made to fit its arrays.

    A ``lax.scan``, ``vmap`` or ``tree_map`` outside jpeft slices a stacked node's
    arrays (one layer per step) but keeps its static ``layout`` and ``kernel_shape``;
    this drops the stacked axes the arrays no longer have.
    """
    depth = len(node.stack_shape)
    if depth == 0:
        return node
    if "kernel" in node.frozen:
        missing = len(node.layout) - node.frozen["kernel"].ndim
    else:
        first = jax.tree_util.tree_leaves(node)[0]
        missing = depth - (first.ndim - _layer_leaf_ndims(node.method, node.config, node.shape, node.dtype)[0])
    if not 0 <= missing <= depth:
        raise ValueError(f"a {node.method} node of kernel shape {node.kernel_shape} holds arrays that do not fit it")
    return layer_meta(node, missing) if missing else node


def matrix_view(node: Node) -> Node:
    """One layer's node as method code expects it: the base ``kernel`` as an (in, out) matrix."""
    node = fit_meta(node)
    if node.stack_shape:
        raise ValueError(
            f"a stacked {node.method} node (kernel {node.kernel_shape}, layout {node.layout!r}) holds "
            f"{math.prod(node.stack_shape)} layers; use one layer (scan over it, or jpeft.wrap) first"
        )
    if "kernel" not in node.frozen or node.layout in ("io", ""):
        return node
    return node.replace(frozen={**node.frozen, "kernel": to_matrix(node.frozen["kernel"], node.layout)})


def map_layers(fn, node: Node, *args):
    """``fn(layer_node, *layer_args)`` for every layer of a stacked node (``jax.vmap`` over
    the stacked axes of the node's arrays and of ``args``); ``fn(node, *args)`` otherwise."""
    node = fit_meta(node)
    depth = len(node.stack_shape)
    if depth == 0:
        return fn(node, *args)
    leaves, _ = jax.tree_util.tree_flatten(node)
    layer_def = jax.tree_util.tree_structure(layer_meta(node, depth))
    f = lambda leaves, *a: fn(jax.tree_util.tree_unflatten(layer_def, leaves), *a)
    for _ in range(depth):
        f = jax.vmap(f)
    return f(leaves, *args)


def _also_train_paths(params: PyTree, also_train, taken: list[str]) -> list[str]:
    if also_train is None:
        return []
    paths = match_targets(params, also_train)
    leaves = dict(leaves_with_paths(params))
    quantized = [p for p in paths if is_quantized(leaves[p])]
    if quantized:
        raise ValueError(f"also_train matches quantized kernels, which stay frozen: {quantized[:10]}")
    clash = [p for p in paths if p in taken]
    if clash:
        raise ValueError(f"also_train matches leaves that are adaptation targets too: {clash[:10]}")
    return paths


def _sibling_biases(params: PyTree, kernels: list[str], method: str) -> list[str]:
    """The ``bias`` next to each targeted ``kernel`` (BitFit), refusing layers without one."""
    leaves = dict(leaves_with_paths(params))
    biases = [p.rsplit("/", 1)[0] + "/bias" if "/" in p else "bias" for p in kernels]
    missing = [k for k, b in zip(kernels, biases) if b not in leaves]
    if missing:
        raise ValueError(
            f"{method} trains the biases of the targeted layers, but these targets have no sibling 'bias': "
            f"{missing[:10]}; narrow the targets to layers with biases"
        )
    return biases


def full_node(leaf: Array) -> Node:
    """A leaf made fully trainable (``also_train``): a float32 copy to train, cast back on use."""
    spec = methods["full"]
    config = spec.config()
    trainable, frozen = spec.init(None, leaf, config)
    return Node("full", config, tuple(leaf.shape), np.dtype(leaf.dtype), trainable, frozen,
                layout="", kernel_shape=tuple(leaf.shape))


def quantized_node(kernel: Quantized) -> Node:
    """A quantized kernel no method adapts as a node with nothing to train (``jpeft.wrap``
    runs it through :func:`linear` like an adapted one): 2-D layers as (in, out), layers of
    other ranks with an empty layout (materialized where used)."""
    layer = tuple(kernel.layer_shape)
    depth = len(kernel.stack_shape)
    layout = "s" * depth + "io" if len(layer) == 2 else ""
    return Node(QUANTIZED, get_method(QUANTIZED).config(), layer if layout else tuple(kernel.shape), np.dtype(kernel.dtype), {},
                {"kernel": kernel}, layout=layout, kernel_shape=tuple(kernel.shape))


def _init_node(spec: Method, method: str, config, key: Array, kernel: Array, layout: str, shared: Any = None) -> Node:
    """One node for ``kernel``; layer ``l`` of a stacked kernel gets its own init with
    ``fold_in(key, l)``. A frozen ``kernel`` entry is the model's array itself, uncopied.
    ``shared`` (what :attr:`Method.shared` made for the whole apply) goes to every
    layer's ``init``; the arrays it hands out stay the same objects in an unstacked node
    (a stacked node holds one copy per layer: its arrays have the stacked axes)."""
    depth = stack_depth(layout)
    keeps_base = []
    extra = () if spec.shared is None else (shared,)

    def layer_init(i, matrix):
        trainable, frozen = spec.init(jax.random.fold_in(key, i) if depth else key, matrix, config, *extra)
        keeps_base.append("kernel" in frozen)
        return trainable, {k: v for k, v in frozen.items() if k != "kernel"}

    trainable, frozen = per_layer(layer_init, plain_kernel(kernel), layout)
    frozen = quantized_like(kernel, frozen)
    if keeps_base[0]:
        frozen = {"kernel": kernel, **frozen}
    return Node(method, config, matrix_shape(kernel.shape[depth:], layout[depth:]), np.dtype(kernel.dtype),
                trainable, frozen, layout=layout, kernel_shape=tuple(kernel.shape))


def _apply_model_scope(params: PyTree, method: str, spec: Method, config, key: Array, model: Any, targets, layout,
                       also_train) -> PyTree:
    """``apply`` of a method that adds computation: its node under ``params["jpeft"][method]``."""
    if model is None:
        raise ValueError(f"{method} adds computation at the model's hook points: pass model= (a model implementing "
                         "the hook protocol, such as jpeft.models.phi's PhiForCausalLM, or its jpeft.hooks.ModelDims)")
    if targets is not None or layout is not None:
        raise ValueError(f"{method} adds computation at the model's hook points and adapts no kernel: targets and "
                         "layout do not apply (choose its layers with its own hyper-parameters)")
    dims = hooks.dims_of(model)
    missing = [p for p in spec.hooks.points if p not in dims.points]
    if missing:
        raise ValueError(f"{method} needs the hook point(s) {missing}, which the model lacks (it runs {list(dims.points)})")
    if not isinstance(params, dict):
        raise TypeError(f"{method} adds a node under params[{hooks.KEY!r}]: params must be a dict, got {type(params).__name__}")
    present = dict(params.get(hooks.KEY, {}))
    if method in present:
        raise ValueError(f"params already hold a {method} node (params[{hooks.KEY!r}][{method!r}])")
    for point in hooks.EXCLUSIVE_POINTS:
        clash = [m for m, n in present.items() if point in get_method(n.method).hooks.points]
        if point in spec.hooks.points and clash:
            raise ValueError(f"{method} and {clash[0]} both use the {point!r} hook point; a tree holds one such method")
    try:
        config.check(dims)
    except ValueError as e:
        raise ValueError(f"{method} does not fit the model: {e}") from None
    full = _also_train_paths(params, also_train, [])
    embedding = dict(leaves_with_paths(params)).get(dims.embedding)  # the node's dtype: the model's parameters'
    dtype = np.dtype(embedding.dtype) if hasattr(embedding, "dtype") else np.dtype("float32")
    trainable, frozen = spec.init(key, dims, config, params)
    node = Node(method, config, (), dtype, trainable, frozen, layout="", kernel_shape=())
    if full:
        params = jax.tree_util.tree_map_with_path(lambda path, leaf: full_node(leaf) if path_str(path) in full else leaf,
                                                  params, is_leaf=is_leaf)
    return {**params, hooks.KEY: {**present, method: node}}


def targets_for(method: str, targets, model: Any) -> dict:
    """The keyword arguments that point :func:`apply` of ``method`` at its place in a model:
    ``targets`` for a method that adapts kernels, ``model`` for one that adds computation
    (for tables and benchmarks that run every method with the same settings)."""
    return {"model": model} if get_method(method).scope == "model" else {"targets": targets}


def apply(params: PyTree, method: str, *, key: Array, targets: str | Iterable[str] | None = None,
          layout: str | dict[str, str] | None = None, also_train: str | Iterable[str] | None = None,
          model: Any = None, **hparams) -> PyTree:
    """Replace every targeted kernel of ``params`` by a node of ``method``.

    Args:
      params: a Flax parameter pytree: linen ``params`` or NNX state from ``nnx.split``
        (kernels compute ``y = x @ K``).
      method: a name in :data:`jpeft.methods` (``lora``, ``dora``, ``lokr``, ``oft``, ``boft``,
        ``shoft``, ``rhoft``, ``hra``, ``vera``, ``dylora``, ``bitfit``, ``full`` or a
        registered one).
      key: a ``jax.random`` key; target ``i`` (in tree order) uses ``fold_in(key, i)``, and
        layer ``l`` of a stacked target ``fold_in(fold_in(key, i), l)``; what all targets
        share (:attr:`Method.shared`: VeRA's projections) is drawn once from
        ``fold_in(key, 2**32 - 1)``.
      targets: a regex or a list of regexes matched against whole '/'-joined paths;
        ``None`` selects the Q/K/V projections (:data:`jpeft.tree.DEFAULT_TARGETS`).
      layout: how a kernel's axes form the matrix its layer computes, one letter per axis
        (``i`` input, ``o`` output, ``s`` leading stacked axis): a string for every
        target or a dict from regex to string; 2-D kernels default to ``"io"``. Attention
        q/k/v kernels (in, heads, head_dim) are ``"ioo"``, its output kernel ``"iio"``,
        layers stacked by ``nn.scan`` ``"sio"``.
      also_train: a regex or a list of regexes of further leaves (biases, a classifier
        head, norms) to train fully (PEFT's ``modules_to_save``): each becomes a ``full``
        node, so :func:`partition` puts it on the trainable side and adapters save it.
      model: for a method that adds computation (prompt, prefix and P-tuning, adapters,
        AdaMix, PaSTA, LoReFT; :mod:`jpeft.hooks`), the model that runs it (one with
        ``jpeft_dims()``, such as the Phi port) or its :class:`jpeft.hooks.ModelDims`.
        Such a method has no targets: its node goes under ``params["jpeft"][method]``.
      **hparams: the method's hyper-parameters (see its config dataclass).

    Returns:
      A pytree of the same structure with :class:`Node` leaves at the targets (or, for a
      method that adds computation, with the ``"jpeft"`` entry added). All validation
      happens here, before any array is touched.
    """
    spec = get_method(method)
    config = make_config(method, **hparams)
    if spec.scope == "model":
        return _apply_model_scope(params, method, spec, config, key, model, targets, layout, also_train)
    chosen = match_targets(params, targets)
    shapes = dict(leaves_with_paths(params))
    layouts = {p: resolve_layout(p, tuple(shapes[p].shape), layout) for p in chosen}
    if spec.scope == "bias":  # BitFit: the targeted layers' biases train, their kernels stay as they are
        full = _sibling_biases(params, chosen, method) + _also_train_paths(params, also_train, chosen)
        chosen = []
    else:
        for p in chosen:
            lay = layouts[p]
            layer_shape = matrix_shape(shapes[p].shape[stack_depth(lay):], lay.lstrip("s"))
            try:
                config.check(layer_shape)
            except ValueError as e:
                seen_as = "" if lay == "io" else f" (layout {lay!r}, one layer as an {layer_shape} matrix)"
                raise ValueError(f"{method} cannot adapt {p!r}{seen_as}: {e}") from None
        full = _also_train_paths(params, also_train, chosen)
    order = {p: i for i, p in enumerate(chosen)}
    shared = None
    if spec.shared is not None and chosen:  # one draw for all targets (VeRA's A, B)
        layers = [
            jax.ShapeDtypeStruct(matrix_shape(shapes[p].shape[stack_depth(layouts[p]):], layouts[p].lstrip("s")), shapes[p].dtype)
            for p in chosen
        ]
        shared = spec.shared(jax.random.fold_in(key, SHARED_KEY), layers, config)

    def convert(path, leaf):
        p = path_str(path)
        if p in order:
            return _init_node(spec, method, config, jax.random.fold_in(key, order[p]), leaf, layouts[p], shared)
        return full_node(leaf) if p in full else leaf

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_leaf)


def _ranked(node: Node, rank: int, where: str = "") -> Node:
    """``node`` evaluating at ``rank`` (:attr:`Method.with_rank`), the error naming the node."""
    spec = get_method(node.method)
    name = f"{where!r} " if where else ""
    if spec.with_rank is None:
        raise ValueError(f"node {name}({node.method}) has no evaluation rank to set; {_ranked_help()}")
    try:
        return node.replace(config=spec.with_rank(node.config, rank))
    except ValueError as e:
        raise ValueError(f"rank={rank!r} does not fit node {name}({node.method}, {node.config}): {e}") from None


def _ranked_help() -> str:
    names = ", ".join(sorted(n for n, m in methods.items() if m.with_rank is not None)) or "none registered"
    return f"rank applies to the methods trained for every rank up to their r ({names})"


def with_rank(adapted: PyTree, rank: int) -> PyTree:
    """``adapted`` with every node whose method has an evaluation rank (DyLoRA) set to
    evaluate at ``rank``: :func:`linear` without a key and :func:`materialize` then use
    the first ``rank`` ranks. Other nodes are unchanged. ValueError, naming the nodes, if
    ``rank`` does not fit one of them (above its ``r``) or if no node has such a rank."""
    leaves = leaves_with_paths(adapted)
    ranked = {p for p, x in leaves if is_node(x) and get_method(x.method).with_rank is not None}
    if not ranked:
        nodes = [f"{p} ({x.method})" for p, x in leaves if is_node(x)]
        raise ValueError(f"rank={rank!r} given, but no node of the tree has an evaluation rank: {nodes[:10]}"
                         f"{' ...' if len(nodes) > 10 else ''}; {_ranked_help()}")

    def convert(path, x):
        p = path_str(path)
        return _ranked(x, rank, p) if p in ranked else x

    return jax.tree_util.tree_map_with_path(convert, adapted, is_leaf=is_leaf)


def materialize_node(node: Node, rank: int | None = None) -> Array:
    """``W'`` of one node in the kernel's own layout and dtype (every layer of a stack);
    ``rank`` keeps the first ``rank`` ranks of a node that has an evaluation rank (DyLoRA)."""
    if rank is not None:
        node = _ranked(node, rank)
    node = dequantized(node)
    spec = get_method(node.method)
    layer = lambda n: from_matrix(spec.materialize(matrix_view(n)).astype(n.dtype), n.layout, n.kernel_shape)
    return map_layers(layer, node)


def materialize(adapted: PyTree, rank: int | None = None) -> PyTree:
    """Plain kernels again: each node becomes ``W'`` in the layout and dtype of the kernel
    it replaced (``full`` nodes their trained array), each quantized kernel its dequantized
    array. The nodes of methods that add computation (``params["jpeft"]``, which no weight
    can absorb) stay, in their inference form where they have one (AdaMix: the averaged
    adapter).

    ``rank``: the rank to keep in the nodes that have an evaluation rank (DyLoRA, trained
    for every rank up to its ``r``); other nodes materialize as usual. See :func:`with_rank`
    for the errors (a rank above a node's ``r``, a tree without such a node)."""
    if rank is not None:
        adapted = with_rank(adapted, rank)
    def plain(x):
        if is_node(x) and get_method(x.method).scope == "model":
            merged = get_method(x.method).hooks.merged
            return x if merged is None else merged(x)
        return materialize_node(x) if is_node(x) else x.dequantize() if is_quantized(x) else x

    return jax.tree_util.tree_map(plain, adapted, is_leaf=is_leaf)


def resolve_full(tree: PyTree) -> PyTree:
    """``tree`` with its ``full`` nodes (``also_train`` leaves, BitFit's biases) replaced by
    their arrays in the leaf's dtype, gradients flowing to them; other nodes stay. What a
    model that consumes kernel nodes itself (:mod:`jpeft.models.phi`) runs on."""
    full = lambda x: is_node(x) and x.method == "full"
    return jax.tree_util.tree_map(lambda x: materialize_node(x) if full(x) else x, tree, is_leaf=is_leaf)


def _none_like(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda _: None, tree, is_leaf=is_quantized)


def partition(adapted: PyTree) -> tuple[PyTree, PyTree]:
    """Split into ``(trainable, frozen)``: two trees of the same structure, each with
    ``None`` where the other has an array (equinox's ``partition``).

    Differentiate only ``trainable`` and give only it to the optimizer; rebuild the
    model's parameters with :func:`combine`.
    """

    def split(leaf, take_trainable: bool):
        if is_node(leaf):
            if take_trainable:
                return leaf.replace(frozen=_none_like(leaf.frozen))
            return leaf.replace(trainable=_none_like(leaf.trainable))
        return None if take_trainable else leaf

    trainable = jax.tree_util.tree_map(lambda l: split(l, True), adapted, is_leaf=is_leaf)
    frozen = jax.tree_util.tree_map(lambda l: split(l, False), adapted, is_leaf=is_leaf)
    return trainable, frozen


def _describe(leaf) -> str:
    if leaf is None:
        return "None"
    if is_node(leaf):
        return f"a {leaf.method} node of shape {leaf.shape} ({leaf.config})"
    return f"an array of shape {tuple(getattr(leaf, 'shape', ()))}"


def _first_mismatch(trainable: PyTree, frozen: PyTree) -> str | None:
    """Where two trees that :func:`combine` should join first differ (nodes compared by
    method, config and shape), or ``None``."""
    def flat(tree):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_leaf(x))
        return [(path_str(p), x) for p, x in leaves]

    a, b = flat(trainable), flat(frozen)
    for (pa, xa), (pb, xb) in zip(a, b):
        if pa != pb:
            return f"at {pa!r} in trainable against {pb!r} in frozen (different keys)"
        same_node = is_node(xa) and is_node(xb) and (xa.method, xa.config, xa.shape) == (xb.method, xb.config, xb.shape)
        if (is_node(xa) or is_node(xb)) and not same_node:
            return f"at {pa!r}: {_describe(xa)} in trainable, {_describe(xb)} in frozen"
    if len(a) != len(b):
        longer, name = (a, "trainable") if len(a) > len(b) else (b, "frozen")
        return f"at {longer[min(len(a), len(b))][0]!r}, which only {name} has"
    return None


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`partition`: take every non-``None`` leaf of either tree.

    Trees that are not two halves of one :func:`partition` are refused, naming the first
    path where they differ (different keys, nodes of another method or config, a leaf
    that both or neither tree holds).
    """
    hint = "combine takes the two halves that jpeft.partition returned for one tree"
    problem = _first_mismatch(trainable, frozen)
    if problem:
        raise ValueError(f"combine: the trainable and frozen trees differ {problem}; {hint}")

    def take(path, a, b):
        if (a is None) == (b is None):
            which = "neither tree has" if a is None else "both trees have"
            raise ValueError(f"combine: {which} an array at {path_str(path)!r}; {hint}")
        return b if a is None else a

    return jax.tree_util.tree_map_with_path(take, trainable, frozen, is_leaf=lambda x: x is None)


def _size(x) -> int:
    return int(math.prod(x.shape)) if hasattr(x, "shape") else 0


def _nbytes(x) -> int:
    """Bytes of an array (or ``ShapeDtypeStruct``), or of a quantized kernel's parts."""
    if is_quantized(x):
        return x.nbytes
    return _size(x) * np.dtype(x.dtype).itemsize if hasattr(x, "dtype") else 0


def count_params(adapted: PyTree) -> dict:
    """Parameter counts: ``trainable``, ``frozen``, ``total`` and one row per target, and
    ``frozen_bytes``, the memory the frozen arrays take (a quantized kernel counts its
    parameters in ``frozen`` and its codes and scales in ``frozen_bytes``).

    Works on ``jax.ShapeDtypeStruct`` leaves, so ``jax.eval_shape(lambda p: apply(p, ...),
    shapes)`` counts a full-size model without allocating it.
    """
    rows = {}
    frozen_total = frozen_bytes = 0
    for p, leaf in leaves_with_paths(adapted):
        if is_node(leaf):
            t = sum(_size(x) for x in jax.tree_util.tree_leaves(leaf.trainable))
            frozen = jax.tree_util.tree_leaves(leaf.frozen, is_leaf=is_quantized)
            f = sum(_size(x) for x in frozen)
            rows[p] = {"method": leaf.method, "shape": leaf.kernel_shape, "layout": leaf.layout, "trainable": t, "frozen": f}
            frozen_total += f
            frozen_bytes += sum(_nbytes(x) for x in frozen)
        else:
            frozen_total += _size(leaf)
            frozen_bytes += _nbytes(leaf)
    trainable_total = sum(r["trainable"] for r in rows.values())
    return {
        "trainable": trainable_total,
        "frozen": frozen_total,
        "total": trainable_total + frozen_total,
        "frozen_bytes": frozen_bytes,
        "targets": rows,
    }


def uses_dropout(kernel: Any) -> bool:
    """Whether ``kernel`` is a node that uses a key in training: its method's dropout
    (a ``dropout`` above 0) or another random draw per step (:attr:`Method.uses_key`:
    DyLoRA's rank). Models pass a ``dropout_key`` to exactly these nodes."""
    if not is_node(kernel):
        return False
    spec = methods.get(kernel.method)
    if spec is not None and spec.uses_key is not None:
        return bool(spec.uses_key(kernel.config))
    return getattr(kernel.config, "dropout", 0) > 0


def linear(x: Array, kernel: Array | Node | Quantized, *, dropout_key: Array | None = None,
           path: str = "auto") -> Array:
    """``x @ W'`` for a plain kernel, a node or a quantized kernel, in the dtype of ``x``.

    For a node, ``path="auto"`` asks the method's cost model (``Method.flops``) whether
    the factored or the materialized form is cheaper for ``x``'s number of rows;
    ``"factored"`` and ``"materialized"`` force one. ``dropout_key`` enables the method's
    training-time randomness (dropout, DyLoRA's rank draw; factored path only, which
    ``"auto"`` then takes). A quantized kernel, bare or as a node's frozen base, is
    dequantized in a remat region (``jax.checkpoint`` saving nothing), so the backward
    pass dequantizes it again rather than keep its full-precision copy until then.
    """
    if is_quantized(kernel) or (is_node(kernel) and holds_quantized(kernel)):
        # dequantize inside a remat region: the backward pass dequantizes again from the codes
        # instead of keeping every layer's full-precision weight alive until it runs
        plain = lambda x, k, key: linear(x, dequantized(k) if is_node(k) else k.dequantize(), dropout_key=key, path=path)
        return jax.checkpoint(plain, policy=jax.checkpoint_policies.nothing_saveable)(x, kernel, dropout_key)
    if not is_node(kernel):
        return x @ kernel.astype(x.dtype)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    kernel = matrix_view(kernel)
    spec = get_method(kernel.method)
    if path == "auto":
        tokens = math.prod(x.shape[:-1])
        factored_cost, materialized_cost = spec.flops(kernel, tokens)
        dropping = dropout_key is not None and uses_dropout(kernel)
        path = "factored" if dropping or factored_cost <= materialized_cost else "materialized"
    if path == "factored":
        return spec.factored(x, kernel, dropout_key)
    return x @ spec.materialize(kernel).astype(x.dtype)
