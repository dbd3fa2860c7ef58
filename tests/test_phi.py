"""The Flax Phi port against transformers' PhiForCausalLM (torch CPU, float32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402

import jpeft  # noqa: E402
from jpeft.models import phi  # noqa: E402
from conftest import METHODS, SMALL_HPARAMS, perturb  # noqa: E402

# odd head count (5 heads of 8), rotary on half of each head
TINY = dict(vocab_size=97, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=5,
            max_position_embeddings=64, partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**TINY)).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("phi")
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return phi.from_pretrained(hf_dir[0])


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, TINY["vocab_size"], (3, 11))


def hf_logits(model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(mask)
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(position_ids)
        return model(torch.tensor(ids), **kwargs).logits.numpy()


def test_logits_match_transformers(hf_dir, loaded, ids):
    model, params = loaded
    ours = model.apply({"params": params}, jnp.asarray(ids))
    assert ours.shape == (3, 11, TINY["vocab_size"]) and ours.dtype == jnp.float32
    assert np.abs(ours - hf_logits(hf_dir[1], ids)).max() <= 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_transformers(hf_dir, loaded, ids, side):
    model, params = loaded
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 3, 5]):
        if pad:
            if side == "right":
                mask[row, -pad:] = 0
            else:
                mask[row, :pad] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    ref = hf_logits(hf_dir[1], ids, mask, positions)
    assert np.abs((ours - ref)[mask.astype(bool)]).max() <= 1e-4


def test_sharded_checkpoint_loads(hf_dir, loaded, ids, tmp_path):
    hf_dir[1].save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model, params = phi.from_pretrained(str(tmp_path))
    np.testing.assert_allclose(model.apply({"params": params}, ids), loaded[0].apply({"params": loaded[1]}, ids), atol=1e-6)


def test_bf16_checkpoint_and_param_dtype(hf_dir, loaded, tmp_path):
    copy = PhiForCausalLM.from_pretrained(hf_dir[0], dtype=torch.bfloat16)
    copy.save_pretrained(tmp_path)
    _, params = phi.from_pretrained(str(tmp_path), param_dtype=jnp.float32)
    rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), loaded[1])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a.dtype == jnp.float32 and bool((a == b).all()), params, rounded))
    model, params = phi.from_pretrained(hf_dir[0], dtype=jnp.bfloat16)
    assert model.dtype == model.param_dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    kernel = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    q_weight = hf_dir[1].model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), q_weight.T.astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(hf_dir, loaded, ids, padded):
    model, params = loaded
    prompt, mask = ids[:, :6].copy(), np.ones((3, 6), np.int64)
    if padded:  # left padding, as HF generate expects
        mask[1, :2] = mask[2, :4] = 0
        prompt[mask == 0] = 0
    eos, pad = 2, 0  # the config's EOS: both implementations stop rows identically
    ours = np.asarray(phi.generate(model, params, jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=20,
                                   eos_token_id=eos, pad_token_id=pad))
    with torch.no_grad():
        ref = hf_dir[1].generate(torch.tensor(prompt), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=20, eos_token_id=eos, pad_token_id=pad).numpy()
    assert ours.shape == (3, 26)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == pad).all()  # HF stops once every row is done; we pad


def test_cache_decoding_equals_full_forward(loaded, ids):
    model, params = loaded
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    cache = phi.init_cache(model, 3, 16)
    logits, cache = model.apply({"params": params}, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache=cache)
    steps = [logits]
    for t in range(6, 11):
        logits, cache = model.apply({"params": params}, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask.astype(bool)], np.asarray(full)[mask.astype(bool)], atol=1e-5)


def test_sampling_respects_top_k_and_eos(loaded, ids):
    model, params = loaded
    prompt = jnp.asarray(ids[:2, :4])
    a = phi.generate(model, params, prompt, max_new_tokens=6, temperature=1.0, top_k=1, key=jax.random.key(0))
    greedy = phi.generate(model, params, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(a, greedy)  # top_k=1 sampling is greedy
    b = phi.generate(model, params, prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, key=jax.random.key(1))
    assert b.shape == (2, 10) and int(b.max()) < TINY["vocab_size"]
    eos = int(greedy[0, 5])  # the second generated token of row 0
    stopped = phi.generate(model, params, prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=96)
    row = np.asarray(stopped[0, 4:])
    first = int(np.argmax(row == eos))
    assert (row[first + 1 :] == 96).all()
    with pytest.raises(ValueError, match="needs a key"):
        phi.generate(model, params, prompt, max_new_tokens=2, temperature=0.7)


def test_inputs_embeds_and_prefix_kv(loaded, ids):
    model, params = loaded
    x = jnp.asarray(ids)
    embeds = params["model"]["embed_tokens"]["embedding"][x]
    np.testing.assert_allclose(model.apply({"params": params}, inputs_embeds=embeds), model.apply({"params": params}, x), atol=1e-6)
    # A prefix of keys equal to the keys of real prefix tokens, attended everywhere, equals running
    # the prefix tokens first: check with a one-token prefix against a cache holding that token.
    cache = phi.init_cache(model, 3, 12)
    _, cache = model.apply({"params": params}, x[:, :1], cache=cache)
    with_cache, _ = model.apply({"params": params}, x[:, 1:], position_ids=jnp.broadcast_to(jnp.arange(1, 11), (3, 10)), cache=cache)
    prefix = [(jnp.swapaxes(c["k"][:, :1], 1, 2), jnp.swapaxes(c["v"][:, :1], 1, 2)) for c in cache["layers"]]
    # positions number the real tokens; the model shifts them past the one-position prefix
    with_prefix = model.apply({"params": params}, x[:, 1:], position_ids=jnp.broadcast_to(jnp.arange(10), (3, 10)), prefix_kv=prefix)
    np.testing.assert_allclose(model.apply({"params": params}, x[:, 1:], prefix_kv=prefix), with_prefix, atol=1e-6)
    np.testing.assert_allclose(with_prefix, with_cache, atol=1e-5)
    without = model.apply({"params": params}, x[:, 1:], position_ids=jnp.broadcast_to(jnp.arange(1, 11), (3, 10)))
    assert np.abs(with_prefix - without).max() > 1e-3
    with pytest.raises(ValueError, match=r"prefix_kv\[0\] key must have shape \(3, 5, 1, 8\), got \(3, 4, 1, 8\)"):
        model.apply({"params": params}, x, prefix_kv=[(k[:, :4], v) for k, v in prefix])
    with pytest.raises(ValueError, match="prefix_kv has 1 entries"):
        model.apply({"params": params}, x, prefix_kv=prefix[:1])


def test_save_pretrained_roundtrip_in_transformers(loaded, ids, tmp_path):
    model, params = loaded
    cfg = PhiConfig(**TINY)
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(0), r=2), jax.random.key(1))
    with pytest.raises(ValueError, match="call jpeft.materialize"):
        phi.save_pretrained(adapted, cfg, str(tmp_path))
    merged = jpeft.materialize(adapted)
    phi.save_pretrained(merged, cfg, str(tmp_path))
    reloaded = PhiForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert np.abs(hf_logits(reloaded, ids) - model.apply({"params": merged}, ids)).max() <= 1e-4


def test_bad_checkpoints_name_the_tensor(hf_dir, tmp_path):
    src = hf_dir[0]
    tensors = load_file(os.path.join(src, "model.safetensors"))

    def write(ts):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        save_file(ts, str(d / "model.safetensors"))
        with open(os.path.join(src, "config.json")) as f:
            (d / "config.json").write_text(f.read())
        return str(d)

    missing = {k: v for k, v in tensors.items() if k != "lm_head.bias"}
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head.bias'\]"):
        phi.from_pretrained(write(missing))
    extra = {**tensors, "model.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.extra.weight'\]"):
        phi.from_pretrained(write(extra))
    bad = {**tensors, "model.layers.0.self_attn.q_proj.weight": np.zeros((40, 39), np.float32)}
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.q_proj.weight has shape \(40, 39\), expected \(40, 40\)"):
        phi.from_pretrained(write(bad))


def test_named_configs_and_phi15_count_without_allocation():
    cfg = phi.config("phi-1.5")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings, cfg.hidden_act, cfg.layer_norm_eps, cfg.bos_token_id, cfg.eos_token_id) == (
        24, 2048, 32, 8192, 51200, 2048, "gelu_new", 1e-5, 50256, 50256)
    spec = phi.make_model(cfg).spec
    assert spec.rotary_dim == 32 and np.isclose(spec.inv_freq[1], 10000.0 ** (-2 / 32), rtol=1e-6)  # θ = 10000
    tiny = phi.config("tiny")
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.eos_token_id) == (1024, 64, 4, 4, 0)
    shapes = jax.eval_shape(lambda k: phi.init(cfg, k, dtype=jnp.bfloat16)[1], jax.random.key(0))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 1_418_270_720
    assert len(jpeft.match_targets(shapes)) == 72  # default targets: Q/K/V of 24 layers
    with pytest.raises(ValueError, match="known:"):
        phi.config("phi-9")


HPARAMS = {"lora": dict(r=4), "dora": dict(r=4), "lokr": dict(r=2), "oft": dict(block_size=8),
           "boft": dict(block_size=4, n_butterfly=2), "shoft": dict(r_u=3, r_v=3), "rhoft": dict(k=12, r_u=3, r_v=3), "hra": dict(r=3),
           # at r=4 MoRA's r̂ is 17 of 40 inputs and LoHa's rank r² 16: materializing is cheaper there
           "mora": dict(r=1), "loha": dict(r=2, alpha=4.0)}


@pytest.fixture(scope="module")
def apply_fn(loaded):
    return jax.jit(lambda p, x: loaded[0].apply({"params": p}, x))


@pytest.mark.parametrize("method", METHODS)
def test_adapted_logits_equal_materialized(loaded, ids, apply_fn, method):
    _, params = loaded
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(2), **HPARAMS.get(method, SMALL_HPARAMS[method])),
                      jax.random.key(3), 0.05)
    nodes = [leaf for _, leaf in jpeft.tree.leaves_with_paths(adapted) if jpeft.is_node(leaf)]
    assert len(nodes) == 6  # Q/K/V of both layers
    for node in nodes:  # linear(path="auto") takes the factored path at this token count
        factored_cost, materialized_cost = jpeft.methods[method].flops(node, ids.size)
        assert factored_cost <= materialized_cost
    factored = apply_fn(adapted, jnp.asarray(ids))
    merged = apply_fn(jpeft.materialize(adapted), jnp.asarray(ids))
    base = apply_fn(params, jnp.asarray(ids))
    assert np.abs(factored - merged).max() <= 1e-4
    assert np.abs(merged - base).max() > 1e-3  # the update really changed the model


def test_adapter_dropout_needs_rng_only_in_training(loaded, ids):
    model, params = loaded
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(4), r=2, dropout=0.5), jax.random.key(5))
    x = jnp.asarray(ids)
    eval_logits = model.apply({"params": adapted}, x)
    train_logits = model.apply({"params": adapted}, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert np.abs(train_logits - eval_logits).max() > 1e-4
    np.testing.assert_allclose(eval_logits, model.apply({"params": jpeft.materialize(adapted)}, x), atol=1e-4)


def test_bad_input_and_unsupported_configs(loaded, ids):
    model, params = loaded
    with pytest.raises(ValueError, match=r"input_ids must have shape \(\*, \*\), got \(11,\)"):
        model.apply({"params": params}, jnp.asarray(ids[0]))
    with pytest.raises(ValueError, match="integer token ids"):
        model.apply({"params": params}, jnp.asarray(ids, jnp.float32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(3, 11\)"):
        model.apply({"params": params}, jnp.asarray(ids), jnp.ones((3, 10)))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model.apply({"params": params})
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings 64"):
        model.apply({"params": params}, jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="exceed max_position_embeddings 64"):
        phi.generate(model, params, jnp.asarray(ids), max_new_tokens=60)
    with pytest.raises(ValueError, match="left-padded prompts"):
        phi.generate(model, params, jnp.asarray(ids), jnp.asarray(ids > 50).at[:, -1].set(False), max_new_tokens=2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        phi.from_pretrained("/nonexistent/phi")
    with pytest.raises(NotImplementedError, match="qk_layernorm"):
        phi.make_model(PhiConfig(**TINY, qk_layernorm=True))
    with pytest.raises(NotImplementedError, match="grouped-query"):
        phi.make_model({**TINY, "num_key_value_heads": 1})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        phi.make_model({**TINY, "model_type": "llama"})


def test_config_dropout_only_in_training(loaded, ids):
    _, params = loaded
    x = jnp.asarray(ids)
    plain = loaded[0].apply({"params": params}, x)
    np.testing.assert_array_equal(loaded[0].apply({"params": params}, x, deterministic=False), plain)  # rates 0: no rng needed
    model = phi.make_model({**TINY, "resid_pdrop": 0.3, "embd_pdrop": 0.1, "attention_dropout": 0.1})
    np.testing.assert_array_equal(model.apply({"params": params}, x), plain)
    train = [model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(k)}) for k in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert np.abs(train[0] - plain).max() > 1e-3 and np.abs(train[0] - train[2]).max() > 1e-3
