"""Prompt tuning, P-tuning (MLP and LSTM encoders) and prefix tuning (with and without
projection) against HF PEFT 0.21 on the same tiny transformers PhiForCausalLM, float32:
PEFT's tensors and inits, logits and gradients of every trainable array, greedy decoding,
and what PEFT's own ``generate`` does under transformers 5 (not what its forward does)."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM  # noqa: E402

import jpeft  # noqa: E402
from jpeft import hooks  # noqa: E402
from jpeft.models import phi  # noqa: E402
from conftest import rel_err  # noqa: E402

# vocab 1024: the bundled tokenizer's ids fit (prompt tuning's text init); no EOS, so
# transformers' generate never stops early
TINY = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, partial_rotary_factor=0.5, bos_token_id=None, eos_token_id=None,
            initializer_range=0.2)
P = 4
TOKENIZER = str(pathlib.Path(jpeft.__file__).parent / "assets" / "tokenizer")
RNG = np.random.RandomState(0)
IDS = RNG.randint(1, 1024, (2, 7))
TARGETS = RNG.randint(0, 1024, (2, 7))
PROMPTS = RNG.randint(1, 1024, (2, 5))  # generation: 2 prompts x NEW tokens
NEW = 6
PEFT_TYPES = dict(task_type="CAUSAL_LM", num_virtual_tokens=P)
CASES = {  # name: (jpeft method, its hyper-parameters, PEFT's config)
    "prompt_tuning": ("prompt_tuning", dict(num_virtual_tokens=P), lambda: peft.PromptTuningConfig(**PEFT_TYPES)),
    "p_tuning_mlp": ("p_tuning", dict(num_virtual_tokens=P, encoder_hidden_size=24),
                     lambda: peft.PromptEncoderConfig(**PEFT_TYPES, encoder_hidden_size=24)),
    "p_tuning_lstm": ("p_tuning", dict(num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=12),
                      lambda: peft.PromptEncoderConfig(**PEFT_TYPES, encoder_reparameterization_type="LSTM",
                                                       encoder_hidden_size=12)),
    "prefix_tuning": ("prefix_tuning", dict(num_virtual_tokens=P), lambda: peft.PrefixTuningConfig(**PEFT_TYPES)),
    "prefix_projection": ("prefix_tuning", dict(num_virtual_tokens=P, projection=True, encoder_hidden_size=24),
                          lambda: peft.PrefixTuningConfig(**PEFT_TYPES, prefix_projection=True, encoder_hidden_size=24)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi")
    PhiForCausalLM(PhiConfig(**TINY)).save_pretrained(path)
    model, params = phi.from_pretrained(path)
    return str(path), model, params


def peft_model(path, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(PhiForCausalLM.from_pretrained(path).eval(), config).eval()


def correspondence(trainable):
    """``(jpeft array, direction or None, PEFT tensor of prompt_encoder.default)`` for each
    array (the LSTM's arrays hold both directions)."""
    for name in trainable:
        parts = name.split("_")
        if name == "embedding":
            yield name, None, "embedding.weight"
        elif parts[0] == "mlp":  # mlp_{k}_{kernel|bias}: the k-th Linear of mlp_head
            yield name, None, f"mlp_head.{2 * int(parts[1])}.{'weight' if parts[2] == 'kernel' else 'bias'}"
        elif parts[0] == "lstm":  # lstm_{l}_{w|b}_{ih|hh}
            torch_name = f"{'weight' if parts[2] == 'w' else 'bias'}_{parts[3]}_l{parts[1]}"
            yield name, 0, f"lstm_head.{torch_name}"
            yield name, 1, f"lstm_head.{torch_name}_reverse"
        else:  # prefix projection: {kernel|bias}_{k}, the k-th Linear of transform
            yield name, None, f"transform.{2 * int(parts[1])}.{'weight' if parts[0] == 'kernel' else 'bias'}"


def to_torch_layout(name, x):
    return np.asarray(x).T if x.ndim == 2 and name != "embedding" else np.asarray(x)


def as_peft(trainable):
    """jpeft's arrays as PEFT's prompt-encoder tensors (torch layout)."""
    return {t: to_torch_layout(n, trainable[n] if d is None else trainable[n][d]) for n, d, t in correspondence(trainable)}


def from_peft(tensors, trainable):
    """PEFT's prompt-encoder tensors (e.g. their gradients) as jpeft's arrays."""
    parts = {}
    for n, d, t in correspondence(trainable):
        parts.setdefault(n, []).append(to_torch_layout(n, np.asarray(tensors[t])))  # a transpose is its own inverse
    return {n: np.stack(x) if trainable[n].ndim > x[0].ndim else x[0] for n, x in parts.items()}


def perturbed(adapted, method, scale=0.1):
    """Every trainable array of the node moved by ``scale``·N(0, 1) (numpy: no program to
    compile per array shape)."""
    node, rng = adapted["jpeft"][method], np.random.RandomState(1)
    moved = {k: jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape).astype(np.float32))
             for k, v in node.trainable.items()}
    return {**adapted, "jpeft": {method: node.replace(trainable=moved)}}


@pytest.fixture(scope="module")
def made(base):
    """``made(case)``: (jpeft's adapted tree (perturbed), PEFT's model holding the same
    arrays), built once per case for the whole module."""
    path, model, params = base
    cache = {}

    def make(case):
        if case not in cache:
            method, hp, config = CASES[case]
            adapted = perturbed(jpeft.apply(params, method, key=jax.random.key(1), model=model, **hp), method)
            theirs = peft_model(path, config())
            encoder = theirs.prompt_encoder["default"]
            ours = as_peft(adapted["jpeft"][method].trainable)
            # the same arrays (so the same parameter count) under PEFT's names
            assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {k: v.shape for k, v in ours.items()}
            encoder.load_state_dict({k: torch.tensor(v) for k, v in ours.items()})
            cache[case] = adapted, theirs
        return cache[case]

    return make


def padded_batch(case):
    """IDS with row 1 padded by 2: right-padded for the virtual-token methods, left-padded
    (and PEFT given the positions transformers' generate would give) for prefix tuning."""
    prefix = CASES[case][0] == "prefix_tuning"
    mask = np.ones_like(IDS)
    mask[1, slice(None, 2) if prefix else slice(-2, None)] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return np.where(mask == 1, IDS, 0), mask, positions, prefix


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_peft(base, made, case):
    """A padded batch: logits of the real tokens and the gradients of their mean token
    cross-entropy with respect to every trainable array, ≤ 1e-5 relative."""
    _, model, _ = base
    adapted, theirs = made(case)
    method = CASES[case][0]
    ids, mask, positions, prefix = padded_batch(case)
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if prefix:  # PEFT adds P to given positions (as the prefix occupies the first P)
        kwargs["position_ids"] = torch.tensor(positions)
    out = theirs(**kwargs).logits
    out = out[:, P:] if not prefix else out  # PEFT returns the virtual tokens' logits too
    logp = torch.log_softmax(out, -1)
    t_mask = torch.tensor(mask, dtype=torch.float32)
    loss = -(torch.gather(logp, -1, torch.tensor(TARGETS)[..., None])[..., 0] * t_mask).sum() / t_mask.sum()
    theirs.zero_grad()
    loss.backward()
    grads = from_peft({n: p.grad for n, p in theirs.prompt_encoder["default"].named_parameters()},
                      adapted["jpeft"][method].trainable)

    trainable, frozen = jpeft.partition(adapted)

    def objective(trainable):
        logits = model.apply({"params": jpeft.combine(trainable, frozen)}, ids, mask)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, jnp.asarray(TARGETS)[..., None], -1)[..., 0]
        return (nll * mask).sum() / mask.sum(), logits

    (value, logits), ours = jax.jit(jax.value_and_grad(objective, has_aux=True))(trainable)
    real = mask.astype(bool)
    assert rel_err(np.asarray(logits)[real], out.detach().numpy()[real]) <= 1e-5
    assert abs(float(value) - loss.item()) <= 1e-5 * abs(loss.item())
    ours = ours["jpeft"][method].trainable
    assert set(ours) == set(grads)
    for name, g in grads.items():
        assert np.linalg.norm(g) > 0, name
        assert rel_err(ours[name], g) <= 1e-5, name


def greedy(next_logits):
    """``NEW`` greedy tokens after ``PROMPTS``: ``next_logits(new)``, with ``new`` the
    tokens chosen so far (B, i), gives the (B, vocab) logits of the next one. Also the
    smallest gap between the two best logits (the tokens are decided by more than rounding)."""
    new, gap = np.zeros((PROMPTS.shape[0], 0), np.int64), np.inf
    for _ in range(NEW):
        with torch.no_grad():
            logits = next_logits(new).double().numpy()
        top = np.sort(logits, axis=-1)[:, -2:]
        gap = min(gap, float((top[:, 1] - top[:, 0]).min()))
        new = np.concatenate([new, logits.argmax(-1)[:, None]], axis=1)
    return new, gap


# one configuration per method (its encoder only changes the embeddings/prefix, which the parity test covers)
@pytest.mark.parametrize("case", ["prompt_tuning", "p_tuning_lstm", "prefix_projection"])
def test_generate(base, made, case):
    """jpeft's ``phi.generate`` (greedy, key/value cache) equals greedy decoding by repeated
    full PEFT forwards; PEFT 0.21's own ``generate`` under transformers 5 does not, and the
    tokens it gives are reproduced exactly by the base model run as it runs it:

    * its ``prepare_inputs_for_generation`` looks for the cache under
      ``model_kwargs["past_key_values"]``, which transformers 5 names ``cache``: it finds
      none at any step, so it "injects the prompt" at every step.
      Prompt/P-tuning: each decode step prepends the P virtual tokens again to the one new
      token (the cache grows by P + 1 a step, positions count them all). Prefix tuning: the
      prefix it builds goes in as ``past_key_values`` beside transformers' ``cache``, and
      the model keeps ``cache`` (``deprecate_kwarg``), so the prefix is dropped while the
      positions are still shifted by P.
    * without the key/value cache (``use_cache=False``) prompt/P-tuning's ``generate`` is
      greedy decoding by full forwards, i.e. jpeft's ``generate``.
    """
    _, model, _ = base
    adapted, theirs = made(case)
    method = CASES[case][0]
    b, t = PROMPTS.shape
    ours = np.asarray(phi.generate(model, adapted, PROMPTS, max_new_tokens=NEW))
    assert (ours[:, :t] == PROMPTS).all()

    def peft_forward(new):
        x = torch.tensor(np.concatenate([PROMPTS, new], axis=1))
        return theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1]

    reference, gap = greedy(peft_forward)
    assert gap > 1e-4
    np.testing.assert_array_equal(ours[:, t:], reference)

    def peft_generate(**kw):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.tensor(PROMPTS)
            return theirs.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                   **kw)[:, t:].numpy()

    hf = theirs.get_base_model()  # transformers' model, without the method
    if method == "prefix_tuning":
        def as_peft_generates(new):  # no prefix; positions from P
            x = torch.tensor(np.concatenate([PROMPTS, new], axis=1))
            return hf(input_ids=x, position_ids=torch.arange(P, P + x.shape[1]).expand(b, -1)).logits[:, -1]
    else:
        with torch.no_grad():
            virtual = theirs.get_prompt(batch_size=b)  # PEFT's P virtual-token embeddings
        embed = lambda ids: hf.get_input_embeddings()(torch.tensor(ids))  # noqa: E731

        def as_peft_generates(new):  # [V; prompt; V; y0; ...; V; y_i-1], positions 0, 1, 2, ...
            parts = [virtual, embed(PROMPTS)] + [x for i in range(new.shape[1]) for x in (virtual, embed(new[:, i:i + 1]))]
            return hf(inputs_embeds=torch.cat(parts, dim=1)).logits[:, -1]

        np.testing.assert_array_equal(peft_generate(use_cache=False), ours[:, t:])
    theirs_cached = peft_generate()
    reproduced, gap = greedy(as_peft_generates)
    assert gap > 1e-4
    np.testing.assert_array_equal(theirs_cached, reproduced)
    assert (theirs_cached != ours[:, t:]).any()  # PEFT's cached generate is not its forward's greedy decoding


def init_distribution(name, trainable):
    """What PEFT's (torch's) init draws the array from: ``"normal"`` (N(0, 1),
    ``nn.Embedding``) or the bound b of U(±b) (``nn.Linear``: 1/√fan_in; ``nn.LSTM``: 1/√e)."""
    parts = name.split("_")
    if name == "embedding":
        return "normal"
    if parts[0] == "lstm":
        return trainable[f"lstm_{parts[1]}_w_hh"].shape[-2] ** -0.5
    kernel = f"mlp_{parts[1]}_kernel" if parts[0] == "mlp" else f"kernel_{parts[1]}"
    return trainable[kernel].shape[0] ** -0.5


def drawn_from(x, dist):
    x = np.asarray(x, np.float64)
    if dist == "normal":
        return abs(x.mean()) < 0.3 and 0.75 < x.std() < 1.25 and np.abs(x).max() > 1.5
    return np.abs(x).max() <= dist and np.abs(x).max() > 0.75 * dist and 0.75 < x.std() * 3**0.5 / dist < 1.25


@pytest.mark.parametrize("case", list(CASES))
def test_inits_are_peft_defaults(base, case):
    """Each array drawn as PEFT draws its tensor (checked on both, jpeft's fresh init and
    a fresh PEFT model): N(0, 1) embeddings, U(±1/√fan_in) Linear and U(±1/√e) LSTM arrays."""
    path, model, params = base
    method, hp, config = CASES[case]
    ours = jpeft.apply(params, method, key=jax.random.key(1), model=model, **hp)["jpeft"][method].trainable
    theirs = {k: v.detach().numpy() for k, v in peft_model(path, config()).prompt_encoder["default"].state_dict().items()}
    for name, direction, peft_name in correspondence(ours):
        dist = init_distribution(name, ours)
        x = ours[name] if direction is None else ours[name][direction]
        assert drawn_from(x, dist), (name, dist)
        assert drawn_from(theirs[peft_name], dist), (peft_name, dist)


@pytest.mark.parametrize("p", [4, 20])  # the text's 9 tokens cut to 4, repeated to 20
def test_text_init_matches_peft(base, p):
    """``init="text"`` with the ids of an init text gives the rows PEFT's
    ``prompt_tuning_init="TEXT"`` makes with the tokenizer (bundled, loaded by
    ``AutoTokenizer``), bit for bit."""
    path, model, params = base
    text = "Answer the question below."
    ids = AutoTokenizer.from_pretrained(TOKENIZER)(text)["input_ids"]
    assert 4 < len(ids) < 20
    ours = jpeft.apply(params, "prompt_tuning", key=jax.random.key(0), model=model, num_virtual_tokens=p, init="text",
                       init_text_ids=ids)["jpeft"]["prompt_tuning"].trainable["embedding"]
    theirs = peft_model(path, peft.PromptTuningConfig(**dict(PEFT_TYPES, num_virtual_tokens=p), prompt_tuning_init="TEXT",
                                                      prompt_tuning_init_text=text, tokenizer_name_or_path=TOKENIZER))
    np.testing.assert_array_equal(np.asarray(ours), theirs.prompt_encoder["default"].embedding.weight.detach().numpy())
    rows = np.resize(ids, p)  # the ids repeated to p, cut at p
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(params["model"]["embed_tokens"]["embedding"])[rows])


def test_phi_1_5_parameter_counts():
    """The docstrings' counts, from shapes alone (nothing allocated): P = 20, d = e = 2048, 24 layers."""
    model = phi.make_model(phi.config("phi-1.5"))
    shapes = phi.param_shapes(model)
    count = lambda method, **hp: jpeft.count_params(jax.eval_shape(  # noqa: E731
        lambda p: jpeft.apply(p, method, key=jax.random.key(0), model=model, **hp), shapes))["trainable"]
    p, d, layers = 20, 2048, 24
    width = layers * 2 * d
    assert count("prompt_tuning") == p * d == 40_960
    assert count("prefix_tuning") == p * width == 1_966_080
    assert count("prefix_tuning", projection=True) == p * d + (d * d + d) + (d * width + width) == 205_662_208
    assert count("p_tuning") == p * d + 3 * (d * d + d) == 12_630_016
    lstm = sum(2 * (4 * d * (inp + d) + 8 * d) for inp in (d, 2 * d))
    assert count("p_tuning", encoder="lstm") == p * d + lstm + (2 * d * 2 * d + 2 * d) + (2 * d * d + d) == 193_050_624


@pytest.mark.parametrize("case", ["p_tuning_lstm", "prefix_projection"])
def test_adapter_round_trip(base, made, case, tmp_path):
    """A jpeft adapter holds every array of the encoders and loads onto the model (checked against it)."""
    from jpeft import checkpoint

    _, model, params = base
    adapted, _ = made(case)
    method = CASES[case][0]
    checkpoint.save_adapter(tmp_path, adapted)
    loaded = checkpoint.load_adapter(tmp_path, params, model=model)["jpeft"][method]
    assert loaded.config == adapted["jpeft"][method].config
    for name, x in adapted["jpeft"][method].trainable.items():
        np.testing.assert_array_equal(loaded.trainable[name], x, err_msg=name)


def test_bad_input_is_refused_with_clear_messages(base, made):
    _, model, params = base
    apply = lambda method, **hp: jpeft.apply(params, method, key=jax.random.key(0), model=model, **hp)  # noqa: E731
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        with pytest.raises(ValueError, match=r"num_virtual_tokens=40 leaves no room for a token in the model's 40 positions"):
            apply(method, num_virtual_tokens=40)
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got 0"):
            apply(method, num_virtual_tokens=0)
    with pytest.raises(ValueError, match=r"encoder must be one of \('mlp', 'lstm'\), got 'gru'"):
        apply("p_tuning", encoder="gru")
    with pytest.raises(ValueError, match="encoder_num_layers=3 applies to the LSTM encoder only"):
        apply("p_tuning", encoder_num_layers=3)
    with pytest.raises(ValueError, match="encoder_hidden_size is the width of the prefix projection: it needs projection=True"):
        apply("prefix_tuning", encoder_hidden_size=8)
    with pytest.raises(ValueError, match="init='text' needs init_text_ids"):
        apply("prompt_tuning", init="text")
    with pytest.raises(ValueError, match=r"init_text_ids \[1024\] are not below the vocabulary size 1024"):
        apply("prompt_tuning", init="text", init_text_ids=[5, 1024])
    # one method per hook point that does not compose (the core refuses the second)
    prompt, prefix = made("prompt_tuning")[0], made("prefix_tuning")[0]
    with pytest.raises(ValueError, match="p_tuning and prompt_tuning both use the 'embeddings' hook point"):
        jpeft.apply(prompt, "p_tuning", key=jax.random.key(0), model=model)
    with pytest.raises(ValueError, match="already hold a prefix_tuning node"):
        jpeft.apply(prefix, "prefix_tuning", key=jax.random.key(0), model=model)
    # sequences that do not fit the positions left by the virtual tokens / the prefix
    long = np.ones((1, 37), np.int32)
    with pytest.raises(ValueError, match="sequence length 37 . 4 virtual tokens exceeds max_position_embeddings 40"):
        model.apply({"params": prompt}, long)
    with pytest.raises(ValueError, match="sequence length 37 . 4 prefix positions exceeds max_position_embeddings 40"):
        model.apply({"params": prefix}, long)
    for adapted, what in ((prompt, "virtual tokens"), (prefix, "prefix positions")):
        with pytest.raises(ValueError, match=f"prompt 30 . 7 new tokens . 4 {what} exceed max_position_embeddings 40"):
            phi.generate(model, adapted, long[:, :30], max_new_tokens=7)
