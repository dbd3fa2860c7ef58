"""GaLore (jpeft.optim): parity with galore-torch 1.0's GaLoreAdamW, state memory at Phi-1.5
size, jit, composition with optax, input checks."""

import dataclasses
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import optim



@pytest.fixture(scope="module")
def reference():
    """Skips without torch and galore-torch (pip install galore-torch==1.0). They are imported
    only by the tests that use them: the import takes seconds (galore_torch's __init__
    imports bitsandbytes), and every xdist worker collects this file."""
    pytest.importorskip("torch")
    pytest.importorskip("galore_torch")

SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (8, 8), "bias": (12,)}
MATRICES = ("tall", "wide", "square")
RANK, GAP, SCALE, LR, WD, STEPS = 3, 3, 0.25, 1e-2, 0.1, 8  # refreshes before updates 1, 4, 7


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def _sign_fixed_svd(orig, flip_calls=()):
    """torch.linalg.svd with jpeft's sign convention (each singular vector the projector
    keeps has its largest-magnitude entry positive: rows of Vh if m >= n, columns of U if
    m < n, the paired vector flipped with it). Calls numbered in ``flip_calls`` (0-based,
    counted per shape) then get their first pair negated."""
    import torch

    calls = {}

    def svd(a, full_matrices=True, **kw):
        u, s, vh = orig(a, full_matrices=full_matrices, **kw)
        m, n = a.shape
        if m >= n:
            pivot = torch.gather(vh, 1, vh.abs().argmax(1, keepdim=True))[:, 0]
        else:
            pivot = torch.gather(u, 0, u.abs().argmax(0, keepdim=True))[0]
        sign = torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)
        k = calls.get(a.shape, 0)
        calls[a.shape] = k + 1
        if k in flip_calls:
            sign[0] = -sign[0]
        return u * sign[None, :], s, vh * sign[:, None]

    return svd


def _run_torch(params, grads, monkeypatch=None, svd=None):
    """galore-torch's GaLoreAdamW on the same parameters and gradients; parameters after
    every step. ``svd`` replaces torch.linalg.svd (galore_projector calls it) for the run."""
    import torch
    from galore_torch import GaLoreAdamW

    with monkeypatch.context() as mp:
        if svd is not None:
            mp.setattr(torch.linalg, "svd", svd)
        tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers-AdamW deprecation note
            opt = GaLoreAdamW(
                [{"params": [tp["bias"]]},
                 {"params": [tp[k] for k in MATRICES], "rank": RANK, "update_proj_gap": GAP,
                  "scale": SCALE, "proj_type": "std"}],
                lr=LR, weight_decay=WD)
        out = []
        for g in grads:
            for k in tp:
                tp[k].grad = torch.from_numpy(g[k].copy())
            opt.step()
            out.append({k: v.detach().numpy().copy() for k, v in tp.items()})
        projectors = {k: opt.state[tp[k]]["projector"].ortho_matrix.numpy().copy() for k in MATRICES}
        return out, projectors


def _run_jax(tx, params, grads, jit=True):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out, state


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_parity_with_galore_torch(reference, monkeypatch):
    import torch

    params, grads = _problem()
    ours, state = _run_jax(optim.galore_adamw(LR, RANK, GAP, SCALE, WD), params, grads)
    assert int(state.count) == STEPS
    # orientation and storage as galore-torch: Q (r × n) for m >= n, P (m × r) for m < n
    assert {k: state.projectors[k].shape for k in MATRICES} == {"tall": (3, 5), "wide": (5, 3), "square": (3, 8)}
    assert isinstance(state.projectors["bias"], optax.MaskedNode)
    assert state.inner_state.mu["tall"].shape == (12, 3) and state.inner_state.mu["wide"].shape == (3, 12)

    # galore-torch with its own (MKL) SVD, singular-vector signs put in jpeft's convention
    ref, ref_proj = _run_torch(params, grads, monkeypatch, svd=_sign_fixed_svd(torch.linalg.svd))
    for t in range(STEPS):
        for k in SHAPES:
            assert _rel(ours[t][k], ref[t][k]) <= 1e-5, (t, k)
            np.testing.assert_allclose(ours[t][k], ref[t][k], rtol=1e-5, atol=1e-6)
    for k in MATRICES:  # the last refresh's projectors (from the gradients of update 7)
        np.testing.assert_allclose(np.asarray(state.projectors[k]), ref_proj[k], atol=1e-5)

    # galore-torch untouched: the same subspaces, signs as MKL returns them
    raw, raw_proj = _run_torch(params, grads, monkeypatch)
    for k in MATRICES:
        ours_p = np.asarray(state.projectors[k])
        vectors_axis = 1 if k == "wide" else 0  # P's columns, Q's rows
        d = np.sign(np.sum(ours_p * raw_proj[k], axis=1 - vectors_axis, keepdims=True))
        np.testing.assert_allclose(ours_p * d, raw_proj[k], atol=1e-5)
    # updates 1-3 use the first projectors only, and within one period P N does not depend on
    # the signs, so the raw run agrees too (after the refresh at update 4 it need not: the
    # moments carried over were built on the old basis; see the next test)
    for t in range(GAP):
        for k in SHAPES:
            assert _rel(ours[t][k], raw[t][k]) <= 1e-5, (t, k)


def test_signs_matter_only_across_a_refresh(reference, monkeypatch):
    """galore-torch keeps the Adam moments when the projector changes, so the trajectory
    depends on the signs of the new singular vectors relative to the old ones: flipping one
    vector at the second SVD leaves updates 1-3 alone and changes updates 4-8."""
    import torch

    params, grads = _problem(1)
    base, _ = _run_torch(params, grads, monkeypatch, svd=_sign_fixed_svd(torch.linalg.svd))
    flipped, _ = _run_torch(params, grads, monkeypatch, svd=_sign_fixed_svd(torch.linalg.svd, flip_calls=(1,)))
    for k in MATRICES:
        for t in range(GAP):
            assert _rel(flipped[t][k], base[t][k]) <= 1e-6
        assert _rel(flipped[GAP][k], base[GAP][k]) > 1e-4
    # flipping the first vector at every refresh (consistently across periods) changes nothing
    everywhere, _ = _run_torch(params, grads, monkeypatch,
                               svd=_sign_fixed_svd(torch.linalg.svd, flip_calls=range(STEPS)))
    for k in MATRICES:
        assert _rel(everywhere[-1][k], base[-1][k]) <= 1e-5


def test_trajectory_independent_of_svd_backend_signs(monkeypatch):
    """jpeft fixes the signs itself: an SVD returning negated singular vectors gives the
    same trajectory."""
    params, grads = _problem(2)
    base, _ = _run_jax(optim.galore_adamw(LR, RANK, GAP, SCALE, WD), params, grads)
    orig = jnp.linalg.svd
    signs = jnp.asarray([-1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])

    def flipped_svd(a, full_matrices=True, **kw):
        u, s, vt = orig(a, full_matrices=full_matrices, **kw)
        d = signs[: s.shape[0]]
        return u * d[None, :], s, vt * d[:, None]

    monkeypatch.setattr(jnp.linalg, "svd", flipped_svd)
    other, _ = _run_jax(optim.galore_adamw(LR, RANK, GAP, SCALE, WD), params, grads)  # traced anew
    for t in range(STEPS):
        for k in SHAPES:
            np.testing.assert_array_equal(other[t][k], base[t][k])


def test_jit_equals_eager_and_schedule():
    params, grads = _problem(3)
    sched = optax.linear_schedule(LR, LR / 4, STEPS)
    tx = optim.galore_adamw(sched, RANK, GAP, SCALE, WD)
    eager, _ = _run_jax(tx, params, grads[:4], jit=False)  # refreshes at updates 1 and 4
    jitted, state = _run_jax(tx, params, grads)
    for t in range(4):
        for k in SHAPES:
            np.testing.assert_allclose(jitted[t][k], eager[t][k], rtol=1e-6, atol=1e-7)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    # the schedule is read at count (0 on the first update): a constant rate of sched(0) agrees
    # on the first step only
    first, _ = _run_jax(optim.galore_adamw(LR, RANK, GAP, SCALE, WD), params, grads[:2], jit=False)
    np.testing.assert_allclose(first[0]["tall"], eager[0]["tall"], rtol=1e-6)
    assert not np.allclose(first[1]["tall"], eager[1]["tall"], rtol=1e-7, atol=0)
    # the learning rate as a hyper-parameter array (optax.inject_hyperparams)
    injected = optax.inject_hyperparams(
        optim.galore_adamw,
        static_args=("rank", "update_proj_gap", "scale", "weight_decay", "b1", "b2", "eps"))(
        learning_rate=LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, weight_decay=WD)
    via_array, _ = _run_jax(injected, params, grads[:2], jit=False)
    for k in SHAPES:
        np.testing.assert_allclose(via_array[1][k], first[1][k], rtol=1e-6)


def test_composes_with_optax_and_unprojected_leaf_is_adam():
    params, grads = _problem(4)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    tx = optim.galore(RANK, GAP, SCALE, inner=optax.adam(LR))
    # nothing selected: optax.adam itself, bit for bit, on every leaf
    nothing = optim.galore(RANK, GAP, SCALE, inner=optax.adam(LR), mask={k: False for k in SHAPES})
    adam = optax.adam(LR)
    s0, a, s = nothing.init(p), adam.init(p), tx.init(p)
    update = jax.jit(tx.update)
    for gt in grads:
        gt = {k: jnp.asarray(v) for k, v in gt.items()}
        u0, s0 = nothing.update(gt, s0, p)
        ua, a = adam.update(gt, a, p)
        for k in SHAPES:
            np.testing.assert_array_equal(np.asarray(u0[k]), np.asarray(ua[k]))
        # with the matrices projected, the bias still gets optax.adam's update (to the ulp:
        # optax's own result for a leaf moves by an ulp with the other leaves of the tree)
        u, s = update(gt, s, p)
        np.testing.assert_allclose(np.asarray(u["bias"]), np.asarray(ua["bias"]), rtol=1e-6, atol=0)
    # chain(galore(inner=scale_by_adam), scale_by_learning_rate) == galore(inner=adam(lr))
    chained = optax.chain(optim.galore(RANK, GAP, SCALE, inner=optax.scale_by_adam()),
                          optax.scale_by_learning_rate(LR))
    sc, s1 = chained.init(p), tx.init(p)
    chained_update = jax.jit(chained.update)
    for gt in grads:
        gt = {k: jnp.asarray(v) for k, v in gt.items()}
        uc, sc = chained_update(gt, sc, p)
        u1, s1 = update(gt, s1, p)
        for k in SHAPES:
            np.testing.assert_allclose(uc[k], u1[k], rtol=1e-5, atol=1e-8)
    # galore's output for a projected leaf lies in the projector's span, scaled
    q = np.asarray(s1.projectors["tall"])  # r × n, rows orthonormal
    np.testing.assert_allclose(np.asarray(u1["tall"]) @ q.T @ q, np.asarray(u1["tall"]), atol=1e-7)


def test_selection_mask_and_dtype():
    params = {"big": jnp.zeros((6, 9)), "small": jnp.zeros((3, 9)), "vec": jnp.zeros(9),
              "conv": jnp.zeros((3, 3, 4, 4)), "half": jnp.zeros((10, 7), jnp.bfloat16)}
    assert optim.projected_leaves(params, rank=3) == {
        "big": True, "small": False, "vec": False, "conv": False, "half": True}
    only_big = lambda tree: {k: k == "big" for k in tree}
    assert optim.projected_leaves(params, 3, mask=only_big) == {
        "big": True, "small": False, "vec": False, "conv": False, "half": False}
    # a mask may select a matrix with min(shape) <= rank: the rank is clipped to min(m, n)
    tx = optim.galore(5, 2, mask={"big": True, "small": True, "vec": False, "conv": False, "half": True})
    s = tx.init(params)
    assert s.projectors["small"].shape == (3, 3) and s.projectors["big"].shape == (6, 5)
    assert s.projectors["half"].shape == (5, 7) and s.projectors["half"].dtype == jnp.bfloat16
    g = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) % 3, params)
    u, s = jax.jit(tx.update)(g, s)
    assert u["half"].dtype == jnp.bfloat16 and s.inner_state.mu["half"].dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree_util.tree_leaves(u))


def test_state_bytes_phi15():
    from jpeft.models import phi

    shapes = jax.eval_shape(lambda k: phi.init(phi.config("phi-1.5"), k)[1], jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    is_kernel = lambda path, x: jax.tree_util.keystr(path).endswith("['kernel']") and len(x.shape) == 2
    mask = jax.tree_util.tree_map_with_path(is_kernel, shapes)
    r = 128
    # exact, from the shapes: r (min + 2 max) per kernel, 2 · size otherwise, float32,
    # plus GaLore's and Adam's int32 counters
    expected = 8 + sum(4 * (r * (min(x.shape) + 2 * max(x.shape)) if is_kernel(pth, x) else 2 * x.size)
                       for pth, x in leaves)
    got = optim.state_bytes(shapes, r, mask=mask)
    assert got == expected
    adam = jax.eval_shape(optax.adam(1e-3).init, shapes)
    adam_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(adam))
    assert adam_bytes == 4 + 8 * sum(x.size for _, x in leaves)
    n_kernels = sum(is_kernel(p, x) for p, x in leaves)
    assert n_kernels == 24 * 6 + 1  # q, k, v, dense, fc1, fc2 per layer, and lm_head
    # 1,418,270,720 parameters. Adam: 2 moments = 11,346,165,760 bytes + its counter.
    # GaLore r=128 on the 145 kernels: 202,113,024 numbers for them (e.g. q_proj 2048 × 2048:
    # 128 · 6144 instead of 2 · 2048²) plus full moments for the embedding (51200 × 2048, not a
    # kernel) and the vectors, 210,907,136: 1,652,080,640 bytes + 2 counters, 14.56 % of Adam's.
    assert sum(x.size for _, x in leaves) == 1_418_270_720
    assert (adam_bytes, got) == (11_346_165_764, 1_652_080_648)
    assert got / adam_bytes == pytest.approx(0.145607, abs=1e-6)
    # the default selection (every 2-D leaf with min(shape) > 128) takes the embedding too: 7.64 %
    assert optim.state_bytes(shapes, r) == 866_697_224
    # plain Adam through state_bytes: a mask selecting nothing (GaLore's counter on top)
    nothing = jax.tree_util.tree_map(lambda _: False, shapes)
    assert optim.state_bytes(shapes, r, mask=nothing) == adam_bytes + 4


def test_bad_input():
    p = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        optim.galore(rank=0)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 2.5"):
        optim.galore(rank=2.5)
    with pytest.raises(ValueError, match=r"update_proj_gap must be an integer >= 1, got 0"):
        optim.galore_adamw(update_proj_gap=0)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got -1"):
        optim.galore(scale=-1.0)
    with pytest.raises(ValueError, match=r"weight_decay=0.1 needs learning_rate"):
        optim.galore(weight_decay=0.1)
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number >= 0, a scalar array or a schedule, got -0.1"):
        optim.galore_adamw(-0.1)
    with pytest.raises(ValueError, match=r"b2 must be a number in \[0, 1\), got 1.0"):
        optim.galore_adamw(b2=1.0)
    with pytest.raises(ValueError, match=r"inner must be an optax.GradientTransformation, got function"):
        optim.galore(inner=lambda g: g)
    with pytest.raises(ValueError, match=r"mask selects \['b'\] with shape \(6,\) .* only 2-D"):
        optim.galore(2, mask={"w": True, "b": True}).init(p)
    with pytest.raises(ValueError, match=r"mask must have the parameters' tree structure"):
        optim.galore(2, mask={"w": True}).init(p)
    with pytest.raises(ValueError, match=r"mask leaves must be Python bools, got 'yes'"):
        optim.galore(2, mask={"w": "yes", "b": False}).init(p)
    tx = optim.galore_adamw(1e-3, 2, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"needs params in update"):
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match=r"state.projectors leaf .* does not fit the update of shape \(8, 6\)"):
        optim.galore(2).update(p, optim.galore(3).init(p))
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got -3"):
        optim.state_bytes(p, -3)
    assert math.isfinite(optim.state_bytes(p, 2))


# --------------------------------------------------------------------------- in training (jpeft train --optimizer galore)


def _galore_state(opt_state):
    """The GaLoreState inside a train.optimizer state."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optim.GaLoreState))
             if isinstance(x, optim.GaLoreState)]
    assert len(found) == 1
    return found[0]


def test_train_config_optimizer_checks():
    from jpeft import train

    assert train.TrainConfig().optimizer == "adamw" and train.OPTIMIZERS == ("adamw", "galore")
    with pytest.raises(ValueError, match=r"optimizer must be one of adamw, galore, got 'sgd'"):
        train.TrainConfig(optimizer="sgd")
    for name, bad in [("galore_rank", 0), ("galore_rank", 2.5), ("galore_update_proj_gap", -1), ("galore_rank", True)]:
        with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {bad!r}"):
            train.TrainConfig(optimizer="galore", **{name: bad})
    for bad in (0.0, -0.25, float("inf")):
        with pytest.raises(ValueError, match=rf"galore_scale must be a positive finite number, got {bad!r}"):
            train.TrainConfig(galore_scale=bad)


def test_train_optimizer_projects_the_large_matrices_only():
    """train.optimizer(optimizer="galore"): clipping, then GaLore around optax's Adam, AdamW's
    decay and the schedule; a matrix with both sides > galore_rank is projected, the other
    leaves get exactly the update of optimizer="adamw"."""
    from jpeft import train

    rng = np.random.default_rng(5)
    params = {"big": jnp.asarray(rng.standard_normal((48, 40)), jnp.float32),
              "small": jnp.asarray(rng.standard_normal((6, 40)), jnp.float32),  # min side 6 <= rank 6
              "vec": jnp.asarray(rng.standard_normal(40), jnp.float32)}
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
             for _ in range(3)]
    common = dict(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0)
    galore_cfg = train.TrainConfig(optimizer="galore", galore_rank=6, galore_update_proj_gap=2, **common)
    tx, adamw = train.optimizer(galore_cfg, 10), train.optimizer(train.TrainConfig(**common), 10)
    g = _galore_state(jax.eval_shape(tx.init, params))
    assert g.projectors["big"].shape == (6, 40)  # Q (r × n) for m >= n
    assert isinstance(g.projectors["small"], optax.MaskedNode) and isinstance(g.projectors["vec"], optax.MaskedNode)
    assert g.inner_state.mu["big"].shape == (48, 6)  # optax's Adam moments in the projected shape
    assert g.inner_state.mu["small"].shape == (6, 40) and g.inner_state.mu["vec"].shape == (40,)

    @jax.jit
    def trajectories(params, grads):  # both optimizers' updates, 3 steps, one compile
        out = []
        for opt in (tx, adamw):
            p, state, updates = params, opt.init(params), []
            for gt in grads:
                u, state = opt.update(gt, state, p)
                p = optax.apply_updates(p, u)
                updates.append(u)
            out.append((updates, state))
        return out

    (ours, s), (theirs, _) = trajectories(params, grads)
    for u, ua in zip(ours, theirs):
        for k in ("small", "vec"):  # the same parameters and gradients: AdamW's update, bit for bit
            np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(ua[k]))
        assert not np.allclose(np.asarray(u["big"]), np.asarray(ua["big"]))
    assert int(_galore_state(s).count) == 3
    # on jpeft trees: a `full` node's trainable is the whole kernel, projected; LoRA's rank-8
    # factors are not at rank 128 (nor at 8), they are at 4
    from jpeft.models import phi

    shapes = jax.eval_shape(lambda k: phi.init(phi.config("tiny"), k)[1], jax.random.key(0))

    def projected(method, rank, **kw):
        tr = jax.eval_shape(lambda p: jpeft.partition(jpeft.apply(p, method, key=jax.random.key(1), **kw))[0], shapes)
        return {jpeft.tree.path_str(pth): on for pth, on in
                jax.tree_util.tree_flatten_with_path(optim.projected_leaves(tr, rank))[0]}

    full = projected("full", 4, targets=r".*/kernel")
    assert len(full) == 25 and all(full.values()) and all(k.endswith("kernel/trainable/weight") for k in full)
    lora = dict(r=8)
    assert not any(projected("lora", 128, **lora).values()) and not any(projected("lora", 8, **lora).values())
    assert all(projected("lora", 4, **lora).values())


@pytest.fixture
def one_train_step(monkeypatch):
    """train.make_train_step built once and reused by every later fit in the test: runs with
    the same model, method and TrainConfig compile their step once (jit's cache is per
    function object, and fit builds a new one per run)."""
    from jpeft import train

    built = {}
    real = train.make_train_step

    def make_once(*args, **kwargs):
        if "step" not in built:
            built["step"] = real(*args, **kwargs)
        return built["step"]

    monkeypatch.setattr(train, "make_train_step", make_once)
    return built


def test_cli_full_training_with_galore_resumes_bit_for_bit(tmp_path, capsys, one_train_step):
    """jpeft train --method full --optimizer galore on the tiny Phi (layer 0's MLP kernels as
    `full` nodes, projected at rank 4: fc1 64 × 256 on the left, fc2 256 × 64 on the right;
    refreshed every 2 steps, before steps 1, 3, 5; one batch of 4, seen at every step): the
    loss goes down and run.json records the optimizer. The same run through train.fit, stopped
    at step 3 (the checkpoint holds GaLore's count and projectors) and resumed, equals it bit
    for bit (losses, gradient norms, trained kernels) across the refresh before step 5."""
    from safetensors.numpy import load_file

    from jpeft import checkpoint, cli, data, pipeline, train

    args = ["train", "--model", "tiny", "--method", "full", "--targets", ".*layers_0/mlp/(fc1|fc2)/kernel",
            "--tasks", "piqa", "--limit", "4", "--dtype", "float32", "--batch-size", "4", "--max-length", "64",
            "--lr", "1e-2", "--warmup-steps", "0",
            "--optimizer", "galore", "--galore-rank", "4", "--galore-update-proj-gap", "2", "--galore-scale", "1",
            "--steps", "6", "--log-every", "1", "--run-dir"]
    cli.main([*args, str(tmp_path / "a"), "--stop-at", "6"])  # uninterrupted (the stop skips the evaluation)
    assert "final loss" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "run.json").read_text())["train"]
    assert {k: saved[k] for k in ("optimizer", "galore_rank", "galore_update_proj_gap", "galore_scale")} == {
        "optimizer": "galore", "galore_rank": 4, "galore_update_proj_gap": 2, "galore_scale": 1.0}

    # the same run as pipeline.finetune sets it up, through train.fit: stopped at 3, resumed
    cfg = cli._run_config(cli.build_parser().parse_args([*args, str(tmp_path / "b")]))
    dtype = jnp.dtype(cfg.train.compute_dtype)
    model, params, _ = pipeline.load_model(cfg.model, dtype, dtype, cfg.seed, cfg.quantize)
    adapted = jpeft.apply(params, cfg.method, key=jax.random.key(cfg.seed), targets=list(cfg.targets))
    encoded = data.encode_pairs(pipeline.training_pairs(cfg), pipeline.load_tokenizer(cfg), cfg.train.max_length)
    fit = lambda **kw: train.fit(model, adapted, encoded, cfg.train, str(tmp_path / "b"), max_steps=6,  # noqa: E731
                                 log_every=1, progress=False, **kw)
    fit(stop_at=3)
    # the checkpoint of step 3: GaLore's count, the projectors of the refresh before step 3
    template = train.init_state(jpeft.partition(adapted)[0], train.optimizer(cfg.train, 6), 0)
    saver = checkpoint.Checkpointer(tmp_path / "b" / "checkpoints")
    state, extra = saver.restore(template)
    saver.close()
    g = _galore_state(state.opt_state)
    assert int(state.step) == int(g.count) == 3 and extra["step"] == 3
    mlp = g.projectors["model"]["layers_0"]["mlp"]
    p = np.asarray(mlp["fc1"]["kernel"].trainable["weight"])  # P, 64 × 4 (64 < 256)
    q = np.asarray(mlp["fc2"]["kernel"].trainable["weight"])  # Q, 4 × 64 (256 >= 64)
    assert p.shape == (64, 4) and q.shape == (4, 64)
    np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-5)
    fit()  # resumes at step 4

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert [r["step"] for r in log("b")] == [1, 2, 3, 4, 5, 6]
    assert log("b") == log("a")  # float equality: bit for bit
    losses = [r["loss"] for r in log("a")]  # on the same batch every step
    assert all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.2, losses
    a, b = (load_file(tmp_path / run / "adapter" / checkpoint.ADAPTER_WEIGHTS) for run in ("a", "b"))
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert one_train_step["step"]._cache_size() == 1  # one compiled step served the three runs
    # LoRA's rank-8 factors at GaLore's default rank 128: nothing projected, fit says so
    lora = jpeft.apply(params, "lora", key=jax.random.key(0), r=8)
    with pytest.warns(UserWarning, match=r"'galore' projects no trainable leaf .* galore_rank=128\): every leaf gets plain AdamW"):
        train.fit(model, lora, encoded, dataclasses.replace(cfg.train, galore_rank=128), str(tmp_path / "c"),
                  max_steps=6, stop_at=0, progress=False)  # stops before the first step: nothing compiled


def test_cli_optimizer_errors(tmp_path, capsys):
    from jpeft import cli

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--optimizer", "sgd", "--run-dir", str(run)])
    assert exit_.value.code == 2 and "argument --optimizer: invalid choice: 'sgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--optimizer", "galore", "--galore-rank", "0", "--run-dir", str(run)])
    assert exit_.value.code == 2 and "galore_rank must be a positive integer, got 0" in capsys.readouterr().err
    assert not run.exists()
