"""LoReFT (Wu et al., 2024) and PaSTA (Yang et al., EACL 2023) against float64 references.

LoReFT: the edit ``h + Rᵀ(W h + b − R h)`` against a float64 NumPy transcription of pyreft
0.1.0's ``LoreftIntervention.forward`` (pyreft/interventions.py), its positions against a
transcription of pyreft 0.1.0's ``parse_positions``/``get_intervention_locations``
(pyreft/dataset.py), ``R``'s init against the QR factor ``torch.nn.init.orthogonal_`` takes,
and the tiny Phi's forward against a float64 NumPy re-run of its blocks with the edit
written out at the chosen layers and positions. PaSTA: the paper's ``H^l + M^l`` (vector
``p`` at the p-th special token of a sequence, as the authors' ``PASTA_modeling.py``
indexes them) in float64 NumPy on the tiny Phi's hidden states.

Tolerances: float32 against float64, relative; stated at each assertion.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import hooks
from jpeft.methods import loreft, pasta
from jpeft.models import phi
from conftest import rel_err

f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731


@pytest.fixture(scope="module")
def tiny():
    """The tiny Phi (hidden 64, 4 layers, 4 heads, vocab 1024) with random weights, biases and
    norms (drawn in NumPy from the parameter shapes: no eager init to compile)."""
    model = phi.make_model(phi.config("tiny"))
    rng = np.random.RandomState(0)

    def draw(path, leaf):
        one = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(one + rng.normal(0, 0.05, leaf.shape).astype(np.float32))

    return model, jax.tree_util.tree_map_with_path(draw, phi.param_shapes(model))


@functools.lru_cache(maxsize=None)
def _captured(model):
    """``model.apply`` jitted, with every module's output captured (one compile per tree and shapes)."""
    return jax.jit(functools.partial(model.apply, capture_intermediates=True))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def hook(module, node, layer, site, out, context, key):
    """``module.residual`` at one site (the stream as the sublayer input too)."""
    return module.residual(node, layer, site, out, out, context, key)


def scaled(adapted, method, seed, **scales):
    """``adapted`` with ``method``'s trainable arrays moved: ``x + s·N(0, 1)`` per named array."""
    node = adapted["jpeft"][method]
    rng = np.random.RandomState(seed)
    moved = {k: v + scales[k] * rng.standard_normal(v.shape).astype(np.float32) if k in scales else v
             for k, v in node.trainable.items()}
    return {**adapted, "jpeft": {**adapted["jpeft"], method: node.replace(trainable=moved)}}


def normal(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


# ------------------------------------------------------------ float64 NumPy Phi blocks


def np_layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * f64(p["scale"]) + f64(p["bias"])


def np_dense(x, p):
    return x @ f64(p["kernel"]) + f64(p["bias"])


def np_rotary(x, positions, rd, theta):
    inv = 1.0 / theta ** (np.arange(0, rd, 2) / rd)
    emb = np.concatenate([positions[..., None] * inv] * 2, -1)[:, :, None, :]
    rot = x[..., :rd]
    half = np.concatenate([-rot[..., rd // 2:], rot[..., : rd // 2]], -1)
    return np.concatenate([rot * np.cos(emb) + half * np.sin(emb), x[..., rd:]], -1)


def np_block(spec, p, x, mask):
    """One Phi decoder layer, ``x + attn(ln x) + mlp(ln x)``, in float64 (``mask``: attended tokens)."""
    b, t, d = x.shape
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    h = np_layer_norm(x, p["input_layernorm"])
    a = p["self_attn"]
    split = lambda y: y.reshape(b, t, spec.heads, spec.head_dim)  # noqa: E731
    theta = phi.config("tiny").rope_parameters["rope_theta"]  # the reference derives the frequencies itself
    q, k = (np_rotary(split(np_dense(h, a[n])), positions, spec.rotary_dim, theta) for n in ("q_proj", "k_proj"))
    v = split(np_dense(h, a["v_proj"]))
    allowed = np.tril(np.ones((t, t), bool))[None, None] & mask.astype(bool)[:, None, None, :]
    scores = np.where(allowed, np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(spec.head_dim), -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np_dense(np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, d), a["dense"])
    g = np_dense(h, p["mlp"]["fc1"])
    g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))  # gelu_new
    return x + attn + np_dense(g, p["mlp"]["fc2"])


def np_forward(spec, params, ids, mask, edit):
    """Float64 logits of the Phi with ``edit(layer, site, x) -> x`` at sites "input"/"output"."""
    m = params["model"]
    x = f64(m["embed_tokens"]["embedding"])[ids]
    for layer in range(spec.layers):
        x = edit(layer, "input", x)
        x = edit(layer, "output", np_block(spec, m[f"layers_{layer}"], x, mask))
    return np_dense(np_layer_norm(x, m["final_layernorm"]), params["lm_head"])


def layer_io(model, params, ids, **kwargs):
    """``(logits, [stream entering layer 0, leaving layer 0, ..., leaving the last layer])``."""
    logits, state = _captured(model)({"params": params}, jnp.asarray(ids), **kwargs)
    inter = state["intermediates"]["model"]
    streams = [inter["embed_tokens"]["__call__"][0]]
    streams += [inter[f"layers_{i}"]["__call__"][0][0] for i in range(model.spec.layers)]
    return logits, [f64(s) for s in streams]


# -------------------------------------------------------------- pyreft 0.1.0, transcribed


def pyreft_parse_positions(positions):
    """pyreft/dataset.py ``parse_positions``."""
    first_n, last_n = 0, 0
    if "+" in positions:
        first_n = int(positions.split("+")[0].strip("f"))
        last_n = int(positions.split("+")[1].strip("l"))
    elif "f" in positions:
        first_n = int(positions.strip("f"))
    elif "l" in positions:
        last_n = int(positions.strip("l"))
    return first_n, last_n


def pyreft_locations(last_position, positions, num_interventions, share_weights, pad_mode="first"):
    """pyreft/dataset.py ``get_intervention_locations``: locations within the prompt, ``-1`` the
    pad sink (a pad token pyreft prepends and nothing attends)."""
    _first_n, _last_n = pyreft_parse_positions(positions)
    first_n = min(last_position // 2, _first_n)
    last_n = min(last_position // 2, _last_n)
    pad_amount = (_first_n - first_n) + (_last_n - last_n)
    pad_position = -1 if pad_mode == "first" else last_position
    if share_weights or (first_n == 0 or last_n == 0):
        position_list = [i for i in range(first_n)] + [i for i in range(last_position - last_n, last_position)] + \
            [pad_position for _ in range(pad_amount)]
        return [position_list] * num_interventions
    left = [i for i in range(first_n)] + [pad_position for _ in range(_first_n - first_n)]
    right = [i for i in range(last_position - last_n, last_position)] + [pad_position for _ in range(_last_n - last_n)]
    if len(left) > len(right):
        right += [pad_position for _ in range(len(left) - len(right))]
    else:
        left += [pad_position for _ in range(len(right) - len(left))]
    return [left] * (num_interventions // 2) + [right] * (num_interventions // 2)


def pyreft_masks(prompt_mask, positions, share_weights):
    """(interventions per layer, batch, length) bool: pyreft's locations placed on each row's
    prompt tokens (its examples run one intervention per layer, two for 'fF+lL' without
    ``share_weights``; the pad sink edits no token here)."""
    per_layer = 2 if "+" in positions and not share_weights else 1
    prompt_mask = np.asarray(prompt_mask, bool)
    out = np.zeros((per_layer, *prompt_mask.shape), bool)
    for row, m in enumerate(prompt_mask):
        tokens = np.flatnonzero(m)
        for g, locations in enumerate(pyreft_locations(len(tokens), positions, per_layer, share_weights)):
            out[g, row, [tokens[i] for i in locations if i >= 0]] = True
    return out


def pyreft_loreft_forward(base, rotate_weight, source_weight, source_bias):
    """pyreft/interventions.py ``LoreftIntervention.forward`` (linear act_fn, no dropout) in
    float64: ``base + (learned_source(base) - rotate_layer(base)) @ rotate_layer.weight.T``
    with ``rotate_layer.weight`` (d, r) = Rᵀ and ``learned_source`` = Linear(d, r)."""
    rotated_base = base @ rotate_weight
    return base + ((base @ source_weight.T + source_bias) - rotated_base) @ rotate_weight.T


# --------------------------------------------------------------------------- LoReFT


def test_loreft_edit_matches_pyreft_forward():
    h, w, b = normal(0, 3, 7, 64, scale=3.0), normal(2, 4, 64, scale=1 / 8), normal(3, 4)
    r = loreft.orthonormal_rows(normal(1, 4, 64))
    ours = loreft.intervene(h, r, w, b)
    ref = pyreft_loreft_forward(f64(h), f64(r).T, f64(w), f64(b))
    assert ours.dtype == jnp.float32
    assert rel_err(ours, ref) <= 1e-6
    assert rel_err(ours - h, ref - f64(h)) <= 1e-5  # the edit itself, not only h + edit
    # it replaces the subspace coordinates: R h' = W h + b, and leaves the complement alone
    np.testing.assert_allclose(f64(ours) @ f64(r).T, f64(h) @ f64(w).T + f64(b), atol=2e-5)
    complement = np.eye(64) - f64(r).T @ f64(r)
    np.testing.assert_allclose(f64(ours) @ complement, f64(h) @ complement, atol=2e-5)


def test_loreft_init_as_pyreft_draws_it(tiny):
    model, params = tiny
    node = jpeft.apply(params, "loreft", key=jax.random.key(3), model=model)["jpeft"]["loreft"]
    shapes = {k: v.shape for k, v in node.trainable.items()}
    assert shapes == {"rotation": (4, 2, 4, 64), "weight": (4, 2, 4, 64), "bias": (4, 2, 4)} and node.frozen == {}
    r = f64(loreft.rotations(node))
    assert np.abs(r @ np.swapaxes(r, -1, -2) - np.eye(4)).max() <= 1e-6
    # torch.nn.init.orthogonal_ on Rᵀ (d × r) keeps the Q of a normal matrix's QR (diag(R) > 0),
    # an orthonormal matrix: the stored rotation is that Q already, so R = rotation
    stored = f64(node.trainable["rotation"])
    assert np.abs(r - stored).max() <= 1e-6
    # distinct draws per layer and intervention; W, b as torch.nn.Linear(d, r): U(+-1/sqrt(d))
    assert np.abs(stored[0, 0] - stored[0, 1]).max() > 0.1 and np.abs(stored[0, 0] - stored[1, 0]).max() > 0.1
    for x in (node.trainable["weight"], node.trainable["bias"]):
        assert 0.9 / 8 < float(jnp.abs(x).max()) <= 1 / 8
    # not the identity at init: ||dh|| = ||(W - R) h + b|| <= (1 + sqrt(r)) ||h|| + sqrt(r / d)
    h = f64(normal(4, 2, 5, 64))
    w, b = f64(node.trainable["weight"][2, 1]), f64(node.trainable["bias"][2, 1])
    delta = np.linalg.norm(pyreft_loreft_forward(h, r[2, 1].T, w, b) - h, axis=-1)
    np.testing.assert_allclose(delta, np.linalg.norm(h @ (w - r[2, 1]).T + b, axis=-1), rtol=1e-6)
    assert np.all(delta <= (1 + 2) * np.linalg.norm(h, axis=-1) + np.sqrt(4 / 64))
    assert np.median(delta) > 1  # about ||R h|| = 2 for a random h: the edit starts far from zero


def test_rotation_stays_orthonormal_under_training(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "loreft", key=jax.random.key(5), model=model, positions="f2+l2")
    trainable, frozen = jpeft.partition(adapted)
    h, target = normal(6, 2, 10, 64), normal(7, 2, 10, 64)
    context = hooks.Context(None, jnp.ones((2, 10), bool))
    opt = optax.adam(0.3)  # large steps: the raw rotation leaves the manifold at once

    @jax.jit
    def step(trainable, state):
        def loss(t):  # the edits of two layers pulled towards a target
            node = jpeft.combine(t, frozen)["jpeft"]["loreft"]
            return sum(jnp.sum((loreft.residual(node, i, "output", h, h, context, None) - target) ** 2) for i in (0, 3))
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    state = opt.init(trainable)
    losses = []
    for _ in range(4):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0]
    node = trainable["jpeft"]["loreft"]
    raw = f64(node.trainable["rotation"])
    assert np.abs(raw[0] @ np.swapaxes(raw[0], -1, -2) - np.eye(4)).max() > 0.1  # off the manifold
    np.testing.assert_array_equal(raw[1], f64(adapted["jpeft"]["loreft"].trainable["rotation"][1]))  # not trained
    r = f64(loreft.rotations(node))
    assert np.abs(r @ np.swapaxes(r, -1, -2) - np.eye(4)).max() <= 1e-6
    # R is the Q factor (positive diagonal) of the raw rotation's transpose, in float64
    q, tri = np.linalg.qr(np.swapaxes(raw, -1, -2))
    q = q * np.sign(np.diagonal(tri, axis1=-2, axis2=-1))[..., None, :]
    assert np.abs(r - np.swapaxes(q, -1, -2)).max() <= 1e-5


# prompt masks of 12 positions: left padding, right padding (answer after the prompt), a short
# prompt between padding and answer, one-, two- and twelve-token prompts
PROMPTS = np.array([
    [0, 0, 0] + [1] * 9,
    [1] * 7 + [0] * 5,
    [0, 0, 1, 1, 1] + [0] * 7,
    [1] + [0] * 11,
    [0] * 10 + [1, 1],
    [1] * 12,
], bool)


@pytest.mark.parametrize("share_weights", [False, True])
@pytest.mark.parametrize("positions", ["f1+l1", "f3+l3", "l1", "f2", "f2+l5"])
def test_positions_follow_pyreft(positions, share_weights):
    config = loreft.LoreftConfig(positions=positions, share_weights=share_weights)
    ours = np.asarray(loreft.selected_positions(jnp.asarray(PROMPTS), config))
    ref = pyreft_masks(PROMPTS, positions, share_weights)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert not ours[:, 3].any()  # a one-token prompt: min(k, 1 // 2) = 0 tokens either side


@pytest.fixture(scope="module")
def edited(tiny):
    """LoReFT of rank 3 on layers 1 and 3, first and last two prompt tokens, moved from init."""
    model, params = tiny
    adapted = jpeft.apply(params, "loreft", key=jax.random.key(6), model=model, rank=3, layers=(1, 3), positions="f2+l2")
    return scaled(adapted, "loreft", 7, rotation=0.3, weight=0.5, bias=0.5)


def test_forward_equals_blocks_with_the_edit_written_out(tiny, edited):
    model, params = tiny
    adapted = edited
    ids = np.random.RandomState(3).randint(1, 1000, (2, 10))
    attention = np.array([[1] * 10, [0, 0, 0] + [1] * 7])
    prompt = np.array([[1] * 7 + [0] * 3, [0, 0, 0] + [1] * 7])  # row 0: a prompt, then its answer
    logits, streams = layer_io(model, adapted, ids, attention_mask=attention, prompt_mask=prompt)
    node = adapted["jpeft"]["loreft"]
    r, w, b = f64(loreft.rotations(node)), f64(node.trainable["weight"]), f64(node.trainable["bias"])
    where = pyreft_masks(prompt, "f2+l2", False)
    assert where.sum() == 8  # 2 interventions x 2 rows x 2 tokens

    def edit(layer, site, x):
        if site != "output" or layer not in (1, 3):
            return x
        slot = (1, 3).index(layer)
        for g in range(2):
            new = pyreft_loreft_forward(x, r[slot, g].T, w[slot, g], b[slot, g])
            x = np.where(where[g][..., None], new, x)
        return x

    real = attention.astype(bool)
    spec = model.spec
    for layer in range(spec.layers):
        before = np_block(spec, params["model"][f"layers_{layer}"], streams[layer], attention)
        expected, got = edit(layer, "output", before), streams[layer + 1]
        assert rel_err(got[real], expected[real]) <= 1e-6, layer
        changed = np.linalg.norm(got - before, axis=-1)
        if layer in (1, 3):  # only the chosen positions move, each by a lot
            assert changed[real & ~where.any(0)].max() <= 1e-5 and changed[where.any(0)].min() > 0.1
        else:
            assert changed[real].max() <= 1e-5
    ref = np_forward(spec, params, ids, attention, edit)
    assert rel_err(logits[real], ref[real]) <= 2e-6
    unedited = np_forward(spec, params, ids, attention, lambda layer, site, x: x)
    assert rel_err(unedited[real], ref[real]) > 1e-2  # the edits matter


def test_generation_edits_the_prompt_pass_only(tiny, edited):
    model, _ = tiny
    prompt = np.random.RandomState(4).randint(1, 1000, (2, 6))
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    new = 4
    out = np.asarray(phi.generate(model, edited, prompt, mask, max_new_tokens=new))
    attention = np.concatenate([mask, np.ones((2, new), int)], axis=1)

    def greedy(prompt_mask):
        # a full forward per step over a fixed buffer (causal: the unwritten tail changes nothing);
        # the shapes of the forward test's, so its compiled program serves
        ids = np.concatenate([prompt, np.zeros((2, new), prompt.dtype)], axis=1)
        for i in range(new):
            logits, _ = layer_io(model, edited, ids, attention_mask=attention, prompt_mask=prompt_mask)
            ids[:, 6 + i] = np.argmax(logits[:, 5 + i], axis=-1)
        return ids

    np.testing.assert_array_equal(out, greedy(np.concatenate([mask, np.zeros((2, new), int)], axis=1)))
    # editing the tokens after the prompt as well (the last two moving each step) decodes otherwise
    assert not np.array_equal(out, greedy(attention))


def test_dropout_drops_the_edited_states_only(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "loreft", key=jax.random.key(10), model=model, positions="f2+l2", dropout=0.5)
    node = adapted["jpeft"]["loreft"]
    assert hooks.uses_key(adapted["jpeft"]) and not hooks.uses_key(jpeft.apply(
        params, "loreft", key=jax.random.key(10), model=model)["jpeft"])
    h = normal(11, 2, 6, 64)
    context = hooks.Context(None, jnp.ones((2, 6), bool))
    kept = f64(hook(loreft, node, 2, "output", h, context, None))
    dropped = f64(hook(loreft, node, 2, "output", h, context, jax.random.key(12)))
    np.testing.assert_array_equal(dropped[:, 2:4], f64(h)[:, 2:4])  # not edited: not dropped
    edited = np.array([0, 1, 4, 5])
    zero = dropped[:, edited] == 0
    assert 0.3 < zero.mean() < 0.7
    np.testing.assert_allclose(dropped[:, edited][~zero], 2 * kept[:, edited][~zero], rtol=1e-6)
    assert np.array_equal(f64(hook(loreft, node, 2, "attn", h, context, jax.random.key(12))), f64(h))


# ---------------------------------------------------------------------------- PaSTA


def pasta_additions(ids, attention, token_ids, vectors):
    """The paper's M^l in float64: vector p at the p-th special token of each sequence
    (padding is no part of it), none past the last vector."""
    out = np.zeros((*ids.shape, vectors.shape[-1]))
    for row in range(ids.shape[0]):
        p = 0
        for i in range(ids.shape[1]):
            if attention[row, i] and ids[row, i] in token_ids:
                if p < vectors.shape[0]:
                    out[row, i] = vectors[p]
                p += 1
    return out


def test_pasta_adds_the_papers_vectors(tiny):
    model, params = tiny
    token_ids = (0, 7)
    adapted = jpeft.apply(params, "pasta", key=jax.random.key(13), model=model, token_ids=token_ids, num_special=3,
                          layers=(0, 2), init_std=0.5)
    node = adapted["jpeft"]["pasta"]
    assert node.trainable["embedding"].shape == (2, 3, 64)
    np.testing.assert_array_equal(node.frozen["token_ids"], token_ids)
    # five special tokens (the last two past num_special); three pads (id 0, special) then two;
    # the same row unpadded, then padded on the right
    ids = np.array([[5, 0, 9, 7, 12, 0, 33, 7, 8, 0, 4],
                    [0, 0, 0, 21, 7, 40, 41, 0, 42, 43, 44],
                    [21, 7, 40, 41, 0, 42, 43, 44, 0, 0, 0]])
    attention = np.array([[1] * 11, [0, 0, 0] + [1] * 8, [1] * 8 + [0, 0, 0]])
    logits, streams = layer_io(model, adapted, ids, attention_mask=attention)
    vectors = f64(node.trainable["embedding"])
    real = attention.astype(bool)
    spec = model.spec
    for layer in range(spec.layers):
        x = streams[layer]
        if layer in (0, 2):
            added = pasta_additions(ids, attention, token_ids, vectors[(0, 2).index(layer)])
            assert np.count_nonzero(added.any(-1)) == 7  # three in row 0, two in rows 1 and 2
            x = x + added
        if layer == 2:  # the hook adds exactly M^l to the tokens: nothing at the others
            context = hooks.Context(jnp.asarray(ids), jnp.asarray(real), jnp.asarray(real))
            stream = f64(jnp.asarray(x, jnp.float32))
            hooked = f64(hook(pasta, node, layer, "input", jnp.asarray(stream, jnp.float32), context, None))
            np.testing.assert_allclose(hooked[real] - stream[real], added[real], atol=1e-6)
            untouched = real & ~added.any(-1)
            np.testing.assert_array_equal(hooked[untouched], stream[untouched])
        expected = np_block(spec, params["model"][f"layers_{layer}"], x, attention)
        assert rel_err(streams[layer + 1][real], expected[real]) <= 1e-6, layer
    ref = np_forward(spec, params, ids, attention, lambda layer, site, x: x + pasta_additions(
        ids, attention, token_ids, vectors[(0, 2).index(layer)]) if site == "input" and layer in (0, 2) else x)
    assert rel_err(logits[real], ref[real]) <= 2e-6
    # left padding moves no vector: the row padded on either side gives the same logits
    assert rel_err(logits[1, 3:], logits[2, :8]) <= 1e-5


def test_pasta_starts_at_the_base_model_and_trains(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "pasta", key=jax.random.key(14), model=model)
    assert adapted["jpeft"]["pasta"].trainable["embedding"].shape == (4, 1, 64)  # the tiny Phi's one special id, 0
    ids = np.random.RandomState(3).randint(1, 1000, (2, 10))
    ids[0, [2, 6]] = 0
    attention = np.ones((2, 10), int)
    trainable, frozen = jpeft.partition(adapted)

    @jax.jit
    def logits_and_grads(t):
        def last(t):  # a logit of the last token of row 0, and all logits
            logits = model.apply({"params": jpeft.combine(t, frozen)}, ids, attention_mask=attention)
            return logits[0, -1, 1], logits
        (_, logits), grads = jax.value_and_grad(last, has_aux=True)(t)
        return logits, grads["jpeft"]["pasta"].trainable["embedding"]

    adapted_logits, grads = logits_and_grads(trainable)
    base = np_forward(model.spec, params, ids, attention, lambda layer, site, x: x)
    assert rel_err(adapted_logits, base) <= 2e-6
    assert (np.abs(f64(grads)).max(axis=(1, 2)) > 0).all()  # every layer's vector reaches the last token


def test_pasta_dropout_and_inputs_embeds(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "pasta", key=jax.random.key(15), model=model, init_std=1.0, dropout=0.5)
    node = adapted["jpeft"]["pasta"]
    h = jnp.zeros((1, 4, 64))
    context = hooks.Context(jnp.array([[0, 4, 0, 9]]), jnp.ones((1, 4), bool))
    dropped = f64(hook(pasta, node, 1, "input", h, context, jax.random.key(16)))
    zero = dropped[0, 0] == 0
    assert 0.3 < zero.mean() < 0.7 and not dropped[0, [1, 2, 3]].any()  # the one vector (num_special=1) at token 0
    np.testing.assert_allclose(dropped[0, 0][~zero], 2 * f64(node.trainable["embedding"][1, 0])[~zero], rtol=1e-6)
    with pytest.raises(ValueError, match="called with inputs_embeds: call it with input_ids"):
        model.apply({"params": adapted}, inputs_embeds=jnp.zeros((1, 3, 64)))


def test_phi_1_5_counts_from_shapes():
    model = phi.make_model(phi.config("phi-1.5"))
    shapes = phi.param_shapes(model)

    def trainable(method, **hp):
        adapted = jax.eval_shape(lambda p: jpeft.apply(p, method, key=jax.random.key(0), model=model, **hp), shapes)
        return jpeft.count_params(adapted)["trainable"]

    d, layers = 2048, 24
    assert trainable("pasta") == layers * 1 * d == 49_152  # <|endoftext|>, Phi-1.5's one special token
    assert trainable("pasta", token_ids=(50256, 50295), num_special=3, layers=(0, 23)) == 2 * 3 * d
    assert trainable("loreft") == layers * 2 * (2 * 4 * d + 4) == 786_624
    assert trainable("loreft", share_weights=True) == trainable("loreft", positions="l1") == layers * (2 * 4 * d + 4)
    assert trainable("loreft", rank=8, layers=(2, 10, 18), positions="f7+l7") == 3 * 2 * (2 * 8 * d + 8)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method, hp, match", [
    ("loreft", dict(rank=64), r"rank=64 must be below the hidden size 64"),
    ("loreft", dict(rank=0), r"rank must be a positive integer, got 0"),
    ("loreft", dict(rank=-2), r"rank must be a positive integer, got -2"),
    ("loreft", dict(layers=(1, 4)), r"layers \[4\] are out of range: the model has 4 layers"),
    ("loreft", dict(layers=(1, 1)), r"layers has repeated indices"),
    ("loreft", dict(layers=(-1,)), r"each of layers must be a non-negative integer"),
    ("loreft", dict(positions="f1+x2"), r"positions must be 'fF\+lL'.*got 'f1\+x2'"),
    ("loreft", dict(positions="l0"), r"positive counts.*got 'l0'"),
    ("loreft", dict(positions="f1l1"), r"got 'f1l1'"),
    ("loreft", dict(positions="f1+"), r"got 'f1\+'"),
    ("loreft", dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ("pasta", dict(token_ids=(5, 1024)), r"token_ids \[1024\] are not below the vocabulary size 1024"),
    ("pasta", dict(token_ids=()), r"token_ids is empty: pass the tokenizer's special token ids"),
    ("pasta", dict(token_ids=(3, 3)), r"repeated ids"),
    ("pasta", dict(num_special=0), r"num_special must be a positive integer"),
    ("pasta", dict(layers=(7,)), r"layers \[7\] are out of range"),
    ("pasta", dict(init_std=-0.1), r"init_std must be a non-negative number"),
])
def test_bad_hyper_parameters_are_refused(tiny, method, hp, match):
    model, params = tiny
    with pytest.raises(ValueError, match=match):
        jpeft.apply(params, method, key=jax.random.key(0), model=model, **hp)


def test_a_model_without_special_tokens_needs_token_ids(tiny):
    model, params = tiny
    bare = dataclasses.replace(model.jpeft_dims(), special_token_ids=())
    with pytest.raises(ValueError, match=r"declares none.*pass token_ids=\(\.\.\.\)"):
        jpeft.apply(params, "pasta", key=jax.random.key(0), model=bare)
    node = jpeft.apply(params, "pasta", key=jax.random.key(0), model=bare, token_ids=[3, 9])["jpeft"]["pasta"]
    assert node.config.token_ids == (3, 9) and node.trainable["embedding"].shape == (4, 2, 64)
