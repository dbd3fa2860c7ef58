"""The Flax Llama-family port against transformers' Llama / Mistral / Qwen2 (torch CPU, float32),
on tiny configurations written by ``save_pretrained``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

import jpeft  # noqa: E402
from jpeft.models import llama  # noqa: E402
from conftest import assert_close_to_scale, perturb  # noqa: E402

VOCAB = 97
_BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, attn_implementation="eager")
CONFIGS = {
    # GQA (2 groups of 2), an explicit head_dim (4 x 16 != 48), Llama 3.1's rope scaling, tied embeddings
    "llama-gqa-llama3-tied": ("LlamaForCausalLM", dict(
        _BASE, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=500.0,
        rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    # one key/value head (multi-query), every bias, linear rope scaling, untied
    "llama-mqa-biases-linear": ("LlamaForCausalLM", dict(
        _BASE, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    # a sliding window shorter than the sequences
    "mistral-window": ("MistralForCausalLM", dict(_BASE, num_key_value_heads=2, sliding_window=5,
                                                  tie_word_embeddings=False)),
    # q/k/v biases
    "qwen2": ("Qwen2ForCausalLM", dict(_BASE, num_key_value_heads=2, tie_word_embeddings=False)),
}


def _hf_model(name):
    arch, kwargs = CONFIGS[name]
    cls = getattr(transformers, arch)
    kwargs = dict(kwargs)
    impl = kwargs.pop("attn_implementation")
    config = cls.config_class(**kwargs)
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(name, HF model, directory, jpeft model, jpeft params) of a tiny configuration."""
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params = llama.from_pretrained(str(path))
    return request.param, hf, str(path), model, params


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(3, VOCAB, (3, 11))


def hf_logits(model, ids, mask=None, position_ids=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_match_transformers(case, ids, padding):
    name, hf, _, model, params = case
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 3, 5]):
        if pad and padding == "right":
            mask[row, -pad:] = 0
        elif pad and padding == "left":
            mask[row, :pad] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)  # what HF generate gives left-padded rows
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask, positions)
    real = mask.astype(bool)
    assert ours.shape == (3, 11, VOCAB)
    assert_close_to_scale(ours[real], ref[real], 1e-4)


def test_the_configurations_are_what_they_claim(case):
    name, hf, _, model, params = case
    s = model.spec
    layer = params["model"]["layers_0"]
    assert ("lm_head" in params) != s.tie_embeddings
    assert s.tie_embeddings == (name == "llama-gqa-llama3-tied")
    assert s.kv_heads == {"llama-mqa-biases-linear": 1}.get(name, 2) and s.heads == 4
    assert ("bias" in layer["self_attn"]["q_proj"]) == (name in ("qwen2", "llama-mqa-biases-linear"))
    assert ("bias" in layer["self_attn"]["o_proj"]) == ("bias" in layer["mlp"]["gate_proj"]) == (
        name == "llama-mqa-biases-linear")
    assert s.sliding_window == (5 if name == "mistral-window" else None)
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (48, 4 * s.head_dim)
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (48, s.kv_heads * s.head_dim)


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(case, ids, padded):
    _, hf, _, model, params = case
    prompt, mask = ids[:, :6].copy(), np.ones((3, 6), np.int64)
    if padded:  # left padding, as HF generate expects
        mask[1, :2] = mask[2, :4] = 0
        prompt[mask == 0] = 0
    eos, pad = 2, 0
    ours = np.asarray(llama.generate(model, params, jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=12,
                                     eos_token_id=eos, pad_token_id=pad))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=12, eos_token_id=eos, pad_token_id=pad).numpy()
    assert ours.shape == (3, 18)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == pad).all()


def test_cache_decoding_equals_full_forward(case, ids):
    _, _, _, model, params = case
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    cache = llama.init_cache(model, 3, 16)
    assert cache["layers"][0]["k"].shape == (3, 16, model.spec.kv_heads, model.spec.head_dim)
    run = jax.jit(lambda x, m, c: model.apply({"params": params}, x, m, cache=c))
    logits, cache = run(jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache)
    steps = [logits]
    for t in range(6, 11):
        logits, cache = run(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(logits)
    real = mask.astype(bool)
    assert_close_to_scale(np.concatenate(steps, axis=1)[real], full[real], 1e-5)


def test_save_pretrained_roundtrip_in_transformers(case, ids, tmp_path):
    name, hf, _, model, params = case
    moved = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    llama.save_pretrained(moved, model_config(case), tmp_path)
    loaded = getattr(transformers, CONFIGS[name][0]).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded).__name__ == CONFIGS[name][0]
    ours = np.asarray(model.apply({"params": moved}, jnp.asarray(ids)))
    assert_close_to_scale(hf_logits(loaded, ids), ours, 1e-4)
    assert np.abs(ours - hf_logits(hf, ids)).max() > 1e-3  # the saved weights are the moved ones


def model_config(case):
    return llama.load_config(case[2])


def test_bf16_and_quantized_loading(case, ids):
    _, _, path, model, params = case
    bf16_model, bf16 = llama.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    ours = np.asarray(bf16_model.apply({"params": bf16}, jnp.asarray(ids)))
    assert_close_to_scale(ours, ref, 5e-2)  # bf16 rounding of weights and activations
    _, nf4 = llama.from_pretrained(path, quantize="nf4", block_size=32)
    assert jpeft.is_quantized(nf4["model"]["layers_0"]["mlp"]["down_proj"]["kernel"])
    quantized = np.asarray(model.apply({"params": nf4}, jnp.asarray(ids)))
    assert np.isfinite(quantized).all() and 0 < np.abs(quantized - ref).max() < 0.5 * np.abs(ref).max()


# ------------------------------------------------------------ methods on the port


def test_adapted_logits_equal_materialized(case, ids):
    """Kernel nodes of the multi-query shapes (a 12-wide key/value projection) run their
    factored path through the port and equal their merged weights."""
    name, _, _, model, params = case
    if name != "llama-mqa-biases-linear":
        pytest.skip("one configuration suffices: the other shapes are the every-method test's")
    apply_fn = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids)))
    base = apply_fn(params)
    for method, hp in (("lora", dict(r=4)), ("oft", dict(block_size=4))):
        adapted = perturb(jpeft.apply(params, method, key=jax.random.key(2), **hp),
                          jax.random.key(3), 0.05)
        merged = apply_fn(jpeft.materialize(adapted))
        assert_close_to_scale(apply_fn(adapted), merged, 1e-4)
        assert np.abs(merged - base).max() > 1e-3


# ---------------------------------------------------------------------- bad input


def test_named_configs_count_without_allocation():
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        llama.param_shapes(llama.make_model(llama.config(name))))) for name in llama.NAMED_CONFIGS}
    # the published sizes (tied embeddings counted once)
    assert counts["smollm2-135m"] == 134_515_008
    assert counts["llama-3.2-1b"] == 1_235_814_400
    assert counts["llama-3-8b"] == 8_030_261_248
    assert counts["mistral-7b"] == 7_241_732_096
    assert counts["qwen2.5-0.5b"] == 494_032_768


def test_bad_input_names_what_is_wrong(case, tmp_path):
    import json

    _, _, path, model, _ = case
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="model_type llama, mistral, qwen2; got model_type 'gpt_neox'"):
        llama.from_pretrained(str(tmp_path))
    with pytest.raises(NotImplementedError, match="hidden_act='gelu'"):
        llama.make_model({**cfg, "hidden_act": "gelu"})
    with pytest.raises(NotImplementedError, match="rope type 'yarn'"):
        llama.make_model({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="unknown Llama-family configuration 'llama-9'"):
        llama.config("llama-9")
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings 64"):
        model.apply({"params": case[4]}, jnp.zeros((1, 65), jnp.int32))


# ------------------------------------------------------------------ PEFT's format


@pytest.mark.parametrize("method,hp", [("lora", dict(r=4, alpha=8.0)), ("dora", dict(r=4, alpha=8.0)),
                                       ("oft", dict(block_size=8, side="in"))])
def test_peft_export_loads_on_transformers_llama(case, ids, tmp_path, method, hp):
    """Adapters trained on the port, exported with the Hugging Face module names, load in
    ``peft.PeftModel`` on transformers' model and give the port's logits."""
    peft = pytest.importorskip("peft")
    from jpeft import peft_format

    name, _, path, model, params = case
    if name != "llama-gqa-llama3-tied":
        pytest.skip("one configuration suffices (GQA: the key/value projections are narrower)")
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(1),
                                  targets=r".*(q_proj|k_proj|v_proj|down_proj)/kernel", **hp), jax.random.key(2), 0.1)
    peft_format.save(adapted, tmp_path, base_model_name_or_path=path)
    ours = np.asarray(model.apply({"params": adapted}, jnp.asarray(ids)))
    assert np.abs(ours - np.asarray(model.apply({"params": params}, jnp.asarray(ids)))).max() > 1e-3
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert_close_to_scale(hf_logits(theirs, ids), ours, 1e-4)
