"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and AdaMix (jpeft.methods.adapter, .adamix).

The ``adapters`` library (1.3.0) cannot be installed beside transformers 5, so its block
is transcribed here in float64 NumPy: ``BottleneckLayer.bottleneck_layer_forward``
(``adapters/methods/bottleneck.py``, a layer hooked through the plugin interface, whose
``add_adapter`` sets ``original_ln_after=False``) running ``Adapter.pre_forward``,
``Adapter.forward``, ``Adapter.post_forward`` or the ``ParallelAdapter`` ones
(``adapters/methods/modeling.py``) with the defaults of ``DoubleSeqBnConfig``,
``SeqBnConfig`` and ``ParBnConfig`` (``adapters/configuration/adapter_config.py``) and
``Activation_Function_Class`` (transformers' ``get_activation``, run in torch float64).
On the whole model, transformers' ``PhiForCausalLM`` in float64 gets the block through
forward hooks where the library's Phi interface puts them (``self_attn.dense`` and
``mlp.fc2`` outputs, the stream entering the layer from a pre-hook on
``input_layernorm``); the parallel adapter reads the MLP's input (our mapping, see the
module docstring). AdaMix's routing and merging follow microsoft/AdaMix's ``MixtureSoup``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402
from transformers.activations import get_activation  # noqa: E402

import jpeft  # noqa: E402
from jpeft.methods import adamix, adapter  # noqa: E402
from jpeft.models import phi  # noqa: E402
from conftest import rel_err  # noqa: E402

KINDS = ("houlsby", "pfeiffer", "parallel")
# the library's config defaults (adapter_config.py: BnConfig and the three subclasses)
LIBRARY = {
    "houlsby": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
                    ln_after=False, mh_adapter=True, output_adapter=True, non_linearity="swish", reduction_factor=16,
                    init_weights="bert", is_parallel=False, scaling=1.0),
    "pfeiffer": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
                     ln_after=False, mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=16,
                     init_weights="bert", is_parallel=False, scaling=1.0),
    "parallel": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
                     ln_after=False, mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2,
                     init_weights="mam_adapter", is_parallel=True, scaling=4.0),
}
# one token shape for every forward pass (the eager programs compile once): inputs IDS[:, :-1]
IDS = np.random.RandomState(0).randint(0, 1000, (2, 9))
X = IDS[:, :-1]


# ------------------------------------------------------------------ the library, transcribed


def library_activation(name):
    """``Activation_Function_Class``: the library's own ``leakyrelu``, else transformers'."""
    f = torch.nn.functional.leaky_relu if name.lower() == "leakyrelu" else get_activation(name.lower())
    return lambda z: f(torch.from_numpy(np.asarray(z, np.float64))).numpy()


def library_layer(hidden_states, input_tensor, w, cfg):
    """``bottleneck_layer_forward(hidden_states, residual_input=input_tensor, layer_norm=None)``
    of a hooked layer with one adapter; ``w``: torch-layout weights (out, in), float64."""
    cfg = dict(cfg, original_ln_after=False)  # BottleneckLayer.add_adapter, is_layer_hooked
    act = library_activation(cfg["non_linearity"])

    def forward(x, residual_input):  # Adapter.forward / ParallelAdapter.forward (no gating, no DropPath)
        down = act(x @ w["down"].T + w["down_bias"])
        up = (down @ w["up"].T + w["up_bias"]) * cfg["scaling"]
        output = up  # dropout 0
        if cfg["is_parallel"]:
            return output  # ln_after False
        if cfg["adapter_residual_before_ln"]:
            output = output + residual_input
        if not cfg["adapter_residual_before_ln"]:
            output = output + residual_input
        return output

    input_hidden_states = hidden_states
    if cfg["is_parallel"]:  # ParallelAdapter.pre_forward
        hs, residual = input_tensor, input_tensor
    else:  # Adapter.pre_forward, layer_norm None
        hs = hidden_states
        if cfg["residual_before_ln"] is True:
            residual = hs
        if cfg["original_ln_before"] and input_tensor is not None:
            hs = hs + input_tensor
        if not cfg["residual_before_ln"]:
            residual = hs
    out = forward(hs, residual)
    if cfg["is_parallel"]:  # ParallelAdapter.post_forward
        out = out + input_hidden_states
    if cfg["original_ln_after"]:  # never, hooked
        out = out + input_tensor
    return out


def torch_layout(arrays, layer, site_index):
    """One site's arrays as float64 torch-layout (out, in) weights."""
    pick = lambda v: np.asarray(v[layer, site_index], np.float64)  # noqa: E731
    return {"down": pick(arrays["down"]).T, "down_bias": pick(arrays["down_bias"]), "up": pick(arrays["up"]).T,
            "up_bias": pick(arrays["up_bias"])}


# ------------------------------------------------------------------ helpers and fixtures


# the tiny Phi of every test: hidden 64, 2 layers; made by transformers (torch), loaded by the port
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers' model in float64, (the port, its float32 params))."""
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**TINY, attn_implementation="eager")).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("phi")
    model.save_pretrained(path)
    return model.double(), phi.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny(hf):
    return hf[1]


def adapted_with(params, model, method, seed, scale=0.3, **hparams):
    """``params`` with a ``method`` node placed by ``jpeft.apply`` (traced only) whose arrays
    are N(0, scale²) NumPy draws (no zero up-projection)."""
    shaped = jax.eval_shape(lambda p: jpeft.apply(p, method, key=jax.random.key(0), model=model, **hparams), params)
    node, rng = shaped["jpeft"][method], np.random.RandomState(seed)
    arrays = {k: jnp.asarray(scale * rng.randn(*v.shape), jnp.float32) for k, v in sorted(node.trainable.items())}
    return {**params, "jpeft": {method: node.replace(trainable=arrays)}}


def loss_fn(model, ids):
    def loss(params, key=None):
        kw = {} if key is None else dict(deterministic=False, rngs={"dropout": key})
        logits = model.apply({"params": params}, ids[:, :-1], **kw)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return loss


# ------------------------------------------------------------------ the adapter block


@pytest.mark.parametrize("kind,site", [("houlsby", "attn"), ("houlsby", "mlp"), ("pfeiffer", "mlp"), ("parallel", "mlp")])
def test_block_matches_the_library_transcription(tiny, kind, site):
    """Same input, same parameters -> same output as the library's hooked-layer path
    with the kind's config defaults, float32 against float64: <= 1e-6 relative."""
    model, params = tiny
    adapted = adapted_with(params, model, "adapter", 2, kind=kind)
    node = adapted["jpeft"]["adapter"]
    cfg = LIBRARY[kind]
    assert (node.config.non_linearity, node.config.reduction_factor, node.config.init_weights, node.config.scaling) == (
        cfg["non_linearity"], cfg["reduction_factor"], cfg["init_weights"], cfg["scaling"])
    o, h, x = jnp.asarray(np.random.RandomState(1).randn(3, 2, 8, 64), jnp.float32)
    ours = adapter.residual(node, 1, site, o, h, None, None)
    # what the library's Phi hooks give the layer: the stream at the attention (pre-hook on
    # input_layernorm), nothing at the MLP (no layer_pre_ffn); the parallel adapter gets h
    input_tensor = {"attn": x, "mlp": h if kind == "parallel" else None}[site]
    want = library_layer(np.asarray(o, np.float64), None if input_tensor is None else np.asarray(input_tensor, np.float64),
                         torch_layout(node.trainable, 1, node.config.sites.index(site)), cfg)
    assert rel_err(ours, want) <= 1e-6
    assert rel_err(ours, o) >= 0.1  # the adapter's part is not negligible


@pytest.mark.parametrize("name", sorted(adapter.NON_LINEARITIES))
def test_non_linearities_are_the_library_ones(name):
    x = jnp.linspace(-8.0, 8.0, 401)
    want = library_activation(name)(np.asarray(x, np.float64))
    assert rel_err(adapter.NON_LINEARITIES[name](x), want) <= 1e-6


def test_names_are_case_insensitive_and_defaults_recorded():
    cfg = adapter.AdapterConfig(kind="houlsby", non_linearity="ReLU", layers=[3, 1])
    assert (cfg.non_linearity, cfg.layers, cfg.sites) == ("relu", (1, 3), ("attn", "mlp"))
    assert adapter.AdapterConfig() == adapter.AdapterConfig(kind="pfeiffer", reduction_factor=16, non_linearity="relu",
                                                            init_weights="bert", scaling=1)
    par = adapter.AdapterConfig(kind="parallel", reduction_factor=4)
    assert (par.reduction_factor, par.scaling, par.init_weights) == (4, 4.0, "mam_adapter")


# ------------------------------------------------------------------ in the Phi model


def hf_logits_with_library_hooks(model64, node, ids):
    """float64 transformers Phi with the block hooked where the library's Phi interface hooks it."""
    cfg, arrays, seen, handles = LIBRARY[node.config.kind], node.trainable, {}, []
    keep = lambda name, i: lambda m, args: seen.__setitem__((name, i), args[0].numpy())  # noqa: E731
    for i, layer in enumerate(model64.model.layers):
        handles.append(layer.input_layernorm.register_forward_pre_hook(keep("x", i)))  # _residual_hook_fn
        handles.append(layer.mlp.register_forward_pre_hook(keep("h", i)))
        for s, site in enumerate(node.config.sites):
            def hook(module, args, output, i=i, s=s, site=site):  # bottleneck.hook_fn
                inp = seen[("x", i)] if site == "attn" else seen[("h", i)] if cfg["is_parallel"] else None
                return torch.from_numpy(library_layer(output.numpy(), inp, torch_layout(arrays, i, s), cfg))
            handles.append((layer.self_attn.dense if site == "attn" else layer.mlp.fc2).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model64(torch.tensor(ids)).logits.numpy()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_phi_forward_matches_transformers_with_the_library_hooks(hf, kind):
    torch_model, (model, params) = hf
    adapted = adapted_with(params, model, "adapter", 3, kind=kind)
    ours = model.apply({"params": adapted}, X)
    want = hf_logits_with_library_hooks(torch_model, adapted["jpeft"]["adapter"], X)
    assert rel_err(ours, want) <= 1e-6  # float32 against float64: measured 3e-7
    assert rel_err(model.apply({"params": params}, X), want) >= 0.01  # the adapters matter


@pytest.mark.parametrize("kind", KINDS)
def test_zero_up_projection_is_the_base_exactly(tiny, kind):
    model, params = tiny
    adapted = adapted_with(params, model, "adapter", 4, kind=kind)
    node = adapted["jpeft"]["adapter"]
    zero_up = {k: jnp.zeros_like(v) if k.startswith("up") else v for k, v in node.trainable.items()}
    adapted = {**params, "jpeft": {"adapter": node.replace(trainable=zero_up)}}
    np.testing.assert_array_equal(model.apply({"params": adapted}, X), model.apply({"params": params}, X))


def test_inits_draw_the_library_distributions(tiny):
    model, params = tiny
    # the parallel kind's default, mam_adapter, through apply: U(±1/sqrt(d)) down, zero up and
    # biases, so the adapted model is the base exactly at init
    adapted = jpeft.apply(params, "adapter", key=jax.random.key(1), model=model, kind="parallel", layers=[1])
    np.testing.assert_array_equal(model.apply({"params": adapted}, X), model.apply({"params": params}, X))
    mam = {k: np.asarray(v) for k, v in adapted["jpeft"]["adapter"].trainable.items()}  # checks in NumPy: no compiles
    assert {k: v.shape for k, v in mam.items()} == {"down": (1, 1, 64, 32), "down_bias": (1, 1, 32),
                                                   "up": (1, 1, 32, 64), "up_bias": (1, 1, 64)}
    assert 0.124 < np.abs(mam["down"]).max() <= 1 / 8 and not any(np.any(mam[k]) for k in ("up", "down_bias", "up_bias"))
    key, lead, d, r = jax.random.key(0), (8, 2), 32, 32  # square: one compiled draw per scheme
    bert, houlsby = ({k: np.asarray(v) for k, v in adapter.init_arrays(key, lead, d, r, s).items()} for s in ("bert", "houlsby"))
    for arrays in (bert, houlsby):
        assert not np.any(arrays["down_bias"]) and not np.any(arrays["up_bias"])
    assert max(abs(np.std(bert[k]) / 0.02 - 1) for k in ("down", "up")) < 0.03
    assert np.abs(houlsby["up"]).max() <= 0.02 and 0.0085 < np.std(houlsby["down"]) < 0.0092
    assert np.abs(bert["down"] - bert["up"]).max() > 0.01  # independent draws


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_touch_their_sites_in_the_chosen_layers(tiny, kind):
    model, params = tiny
    adapted = adapted_with(params, model, "adapter", 2, kind=kind, layers=[1])
    node = adapted["jpeft"]["adapter"]
    assert node.config.layers == (1,) and node.trainable["down"].shape[:2] == (1, len(node.config.sites))
    out, inp = jnp.ones((2, 8, 64)), jnp.full((2, 8, 64), 0.5)
    touched = {(layer, site) for layer in range(2) for site in ("input", "attn", "mlp", "output")
               if adapter.residual(node, layer, site, out, inp, None, None) is not out}
    assert touched == ({(1, "attn"), (1, "mlp")} if kind == "houlsby" else {(1, "mlp")})


def test_dropout_acts_on_the_scaled_output_in_training_only(tiny):
    """The library's ``self.dropout(up * scaling)``: each entry of the adapter's part is
    dropped or kept and divided by 1 - p; without a key (evaluation) nothing is dropped."""
    model, params = tiny
    node = adapted_with(params, model, "adapter", 2, kind="pfeiffer", dropout=0.5)["jpeft"]["adapter"]
    assert adapter.uses_key(node.config) and not adapter.uses_key(adapter.AdapterConfig())
    out = jnp.asarray(np.random.RandomState(3).randn(2, 8, 64), jnp.float32)
    part = adapter.residual(node, 0, "mlp", out, out, None, None) - out
    dropped = adapter.residual(node, 0, "mlp", out, out, None, jax.random.key(4)) - out
    kept = np.isclose(dropped, 2 * part, rtol=1e-5, atol=1e-6)
    assert np.all(kept | (dropped == 0)) and 0.4 < kept.mean() < 0.6
    undropped = node.replace(config=adapter.AdapterConfig(kind="pfeiffer"))
    np.testing.assert_array_equal(part + out, adapter.residual(undropped, 0, "mlp", out, out, None, None))


# ------------------------------------------------------------------ AdaMix


def test_adamix_routes_one_expert_per_side_drawn_from_the_key(tiny):
    model, params = tiny
    adapted = adapted_with(params, model, "adamix", 2, num_experts=3)
    node = adapted["jpeft"]["adamix"]
    assert node.config.non_linearity == "gelu" and node.trainable["down"].shape == (2, 1, 3, 64, 4)
    out, inp = jnp.asarray(np.random.RandomState(5).randn(2, 2, 8, 64), jnp.float32)
    site = {k: v[1, 0] for k, v in node.trainable.items()}
    candidates = {(i, j): adapter.block({"down": site["down"][i], "down_bias": site["down_bias"][i], "up": site["up"][j],
                                         "up_bias": site["up_bias"][j]}, out, inp, node.config, None)
                  for i in range(3) for j in range(3)}
    drawn = []
    for k in range(24):
        key = jax.random.key(100 + k)
        y = adamix.residual(node, 1, "mlp", out, inp, None, key)
        np.testing.assert_array_equal(y, adamix.residual(node, 1, "mlp", out, inp, None, key))  # deterministic given the key
        (pair,) = [p for p, c in candidates.items() if np.array_equal(y, c)]
        drawn.append(pair)
    assert len(set(drawn)) >= 6 and {i for i, _ in drawn} == {0, 1, 2} and {j for _, j in drawn} == {0, 1, 2}
    assert adamix.residual(node, 1, "attn", out, inp, None, jax.random.key(0)) is out


def test_adamix_shared_side_always_takes_its_single_projection():
    config = adamix.AdaMixConfig(num_experts=4, share_up=True)
    assert config.experts == {"down": 4, "up": 1}
    routes = [adamix.route(jax.random.key(k), config.experts) for k in range(16)]
    assert {int(r["up"]) for r in routes} == {0} and len({int(r["down"]) for r in routes}) > 1
    assert adamix.uses_key(config) and not adamix.uses_key(adamix.AdaMixConfig(num_experts=1))
    assert not adamix.uses_key(adamix.AdaMixConfig(share_down=True, share_up=True))


def test_adamix_training_is_random_evaluation_is_the_merged_adapter(tiny):
    model, params = tiny
    adapted = adapted_with(params, model, "adamix", 2, kind="houlsby")
    train = lambda k: model.apply({"params": adapted}, X, deterministic=False, rngs={"dropout": jax.random.key(k)})  # noqa: E731
    np.testing.assert_array_equal(train(7), train(7))
    assert rel_err(train(7), train(8)) > 1e-3
    merged = jpeft.materialize(adapted)["jpeft"]["adamix"]
    node = adapted["jpeft"]["adamix"]
    assert merged.method == "adapter" and merged.config == adapter.AdapterConfig(kind="houlsby", non_linearity="gelu")
    means = {k: np.mean(np.asarray(v, np.float64), axis=2) for k, v in node.trainable.items()}  # over the experts
    for k, v in merged.trainable.items():
        np.testing.assert_allclose(v, means[k], rtol=1e-6, atol=1e-7)
    # the adapter method's own node holding the float64 means (rounded to float32)
    plain = adapted_with(params, model, "adapter", 0, kind="houlsby", non_linearity="gelu")
    means = {k: jnp.asarray(v, jnp.float32) for k, v in means.items()}
    plain = {**plain, "jpeft": {"adapter": plain["jpeft"]["adapter"].replace(trainable=means)}}
    evaluation = model.apply({"params": adapted}, X)
    assert rel_err(evaluation, model.apply({"params": plain}, X)) <= 1e-6
    assert rel_err(evaluation, train(7)) > 1e-3


def test_gradients_reach_every_array_and_a_step_lowers_the_loss(tiny):
    """One backward pass through a tree holding a node of every kind and an AdaMix node
    (the hooks run every node of ``params["jpeft"]``, whatever its name): every adapter
    array gets a gradient in each of its layers and sites, AdaMix's in the routed
    expert of each side only, and one gradient step lowers the loss. On the first layer of
    the tiny Phi alone (a 1-layer model, for a shorter compile)."""
    params = {"model": {k: v for k, v in tiny[1]["model"].items() if k != "layers_1"}, "lm_head": tiny[1]["lm_head"]}
    model = phi.make_model(PhiConfig(**dict(TINY, num_hidden_layers=1)))
    nodes = {kind: adapted_with(params, model, "adapter", i, scale=0.1, kind=kind, reduction_factor=4)
             for i, kind in enumerate(KINDS)}
    nodes = {k: v["jpeft"]["adapter"] for k, v in nodes.items()}
    nodes["adamix"] = adapted_with(params, model, "adamix", 5, scale=0.1, layers=[0], kind="houlsby")["jpeft"]["adamix"]
    key, loss = jax.random.key(9), loss_fn(model, jnp.asarray(IDS))
    with_arrays = lambda arrays: {**params, "jpeft": {k: n.replace(trainable=arrays[k]) for k, n in nodes.items()}}  # noqa: E731
    arrays = {k: n.trainable for k, n in nodes.items()}
    step = jax.jit(jax.value_and_grad(lambda a: loss(with_arrays(a), key)))  # one compiled program
    before, grads = step(arrays)
    g_np = jax.tree_util.tree_map(np.asarray, grads)  # checks in NumPy: no compiles
    for kind in KINDS:
        for name, g in g_np[kind].items():  # (layers, sites, ...): no slice without a gradient
            assert np.all(np.any(g.reshape(*g.shape[:2], -1) != 0, axis=-1)), (kind, name)
    for name, g in g_np["adamix"].items():  # (1 layer, 2 sites, 4 experts, ...): one expert per side and site
        assert np.any(g.reshape(2, 4, -1) != 0, axis=-1).sum(axis=-1).tolist() == [1, 1], name
    stepped = jax.tree_util.tree_map(lambda v, g: np.asarray(v) - 0.5 * g, arrays, g_np)
    assert float(step(stepped)[0]) < float(before) - 1e-4


def test_adapter_exports_reload_and_adamix_exports_its_merged_adapter(tiny, tmp_path):
    from jpeft import checkpoint

    model, params = tiny
    for i, (method, hparams) in enumerate([("adapter", dict(kind="houlsby", layers=[1], non_linearity="tanh")),
                                           ("adamix", dict(num_experts=3, share_up=True))]):
        adapted = adapted_with(params, model, method, 6, **hparams)
        for j, tree in enumerate([adapted, jpeft.materialize(adapted)]):
            checkpoint.save_adapter(tmp_path / f"{i}{j}", tree)
            loaded = checkpoint.load_adapter(tmp_path / f"{i}{j}", params, model=model)
            assert loaded["jpeft"][method].config == tree["jpeft"][method].config  # the JSON round trip keeps it
            np.testing.assert_array_equal(model.apply({"params": loaded}, X), model.apply({"params": adapted}, X))
    assert loaded["jpeft"]["adamix"].method == "adapter"


def test_adamix_counts_experts_times_the_adapter(tiny):
    model, params = tiny
    count = lambda method, **kw: jpeft.count_params(adapted_with(params, model, method, 0, **kw))["trainable"]  # noqa: E731
    one = count("adapter", kind="houlsby")
    assert one == 2 * 2 * (2 * 64 * 4 + 4 + 64)
    assert count("adamix", kind="houlsby", num_experts=5) == 5 * one
    assert count("adamix", kind="houlsby", num_experts=5, share_up=True) == 2 * 2 * (5 * (64 * 4 + 4) + (4 * 64 + 64))


def test_consistency_loss_is_the_official_symmetric_kl():
    """Against ``symmetric_KL_loss`` of the official code, transcribed in torch float64."""
    def official(p, q, mask=None):
        p, q = torch.from_numpy(np.asarray(p, np.float64)), torch.from_numpy(np.asarray(q, np.float64))
        if mask is not None:
            p, q = p.reshape(-1, p.shape[-1])[torch.from_numpy(mask.reshape(-1))], q.reshape(-1, q.shape[-1])[torch.from_numpy(mask.reshape(-1))]
        kl = lambda a, b: torch.nn.functional.kl_div(a.log_softmax(-1), b.softmax(-1), reduction="batchmean")  # noqa: E731
        return float(0.5 * (kl(p, q) + kl(q, p)))

    rng = np.random.RandomState(0)
    a, b = rng.randn(6, 5).astype(np.float32), rng.randn(6, 5).astype(np.float32)
    assert abs(float(adamix.consistency_loss(a, b)) / official(a, b) - 1) <= 1e-6
    a3, b3, mask = rng.randn(2, 7, 11).astype(np.float32), rng.randn(2, 7, 11).astype(np.float32), rng.rand(2, 7) > 0.4
    assert abs(float(adamix.consistency_loss(a3, b3, mask)) / official(a3, b3, mask) - 1) <= 1e-6
    # the targets are held constant: the gradient is p_a - p_b per row (over the row count)
    g = jax.grad(lambda x: adamix.consistency_loss(x, b))(jnp.asarray(a))
    want = 0.5 * (jax.nn.softmax(a, -1) - jax.nn.softmax(b, -1)) / 6
    assert rel_err(g, want) <= 1e-5


# ------------------------------------------------------------------ sizes and bad input


def test_phi15_counts_from_shapes():
    model = phi.make_model(phi.config("phi-1.5"))
    shapes = phi.param_shapes(model)
    count = lambda method, **kw: jpeft.count_params(jax.eval_shape(  # noqa: E731
        lambda p: jpeft.apply(p, method, key=jax.random.key(0), model=model, **kw), shapes))["trainable"]
    d, layers = 2048, 24
    per = lambda r: 2 * d * r + r + d  # noqa: E731
    assert count("adapter", kind="pfeiffer") == layers * (2048 * 128 + 128 + 128 * 2048 + 2048) == 12_635_136
    assert count("adapter", kind="houlsby") == 2 * layers * per(128) == 25_270_272
    assert count("adapter", kind="parallel") == layers * per(1024) == 100_737_024
    assert count("adapter", kind="pfeiffer", reduction_factor=64, layers=[0, 23]) == 2 * per(32)
    assert count("adamix") == 4 * 12_635_136 == 50_540_544


@pytest.mark.parametrize("method,hparams,message", [
    ("adapter", dict(reduction_factor=3), "reduction_factor=3 does not divide the model's hidden size 64"),
    ("adamix", dict(reduction_factor=128), "reduction_factor=128 does not divide the model's hidden size 64"),
    ("adapter", dict(kind="lora"), r"kind must be one of \['houlsby', 'parallel', 'pfeiffer'\], got 'lora'"),
    ("adapter", dict(non_linearity="softmax"), r"non_linearity must be one of \[.*'relu'.*'swish'.*\], got 'softmax'"),
    ("adapter", dict(layers=[1, 4]), r"layers \[4\] are out of range: the model has 2 layers \(0 to 1\)"),
    ("adamix", dict(layers=[7]), r"layers \[7\] are out of range"),
    ("adapter", dict(layers=[-1]), "layers must be None .* or a non-empty list of layer indices"),
    ("adapter", dict(layers=[]), "layers must be None"),
    ("adapter", dict(layers=[1, 1]), "layers repeats an index"),
    ("adamix", dict(num_experts=0), "num_experts must be a positive integer, got 0"),
    ("adamix", dict(num_experts=2.0), "num_experts must be a positive integer"),
    ("adamix", dict(share_up=1), "share_up must be True or False"),
    ("adapter", dict(reduction_factor=0), "reduction_factor must be a positive integer"),
    ("adapter", dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ("adapter", dict(init_weights="xavier"), "init_weights must be one of"),
    ("adapter", dict(scaling=0.0), "scaling must be a finite non-zero number"),
])
def test_bad_input_is_refused_with_its_reason(tiny, method, hparams, message):
    model, params = tiny
    with pytest.raises(ValueError, match=message):
        jpeft.apply(params, method, key=jax.random.key(0), model=model, **hparams)
