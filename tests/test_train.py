"""Training, resume, accumulation, data parallelism, checkpoints and evaluation on a tiny Phi."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import PhiConfig

import jpeft
from jpeft import checkpoint, data, eval as evaluation, train
from jpeft.models import phi
from conftest import METHODS, perturb, rel_err

SMALL = PhiConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, partial_rotary_factor=0.5, eos_token_id=0, bos_token_id=0, pad_token_id=0)
CONFIG = train.TrainConfig(learning_rate=1e-2, warmup_steps=2, batch_size=4, max_length=48, compute_dtype="float32")


@pytest.fixture(scope="module")
def setup():
    model, params = phi.init(SMALL, jax.random.key(0))
    tok = data.default_tokenizer()
    examples = data.load_task("piqa", "train", path=data.sample_path("piqa", "train"))
    encoded = data.encode_pairs(data.training_pairs(examples), tok, CONFIG.max_length)
    return model, params, tok, encoded


def losses(records):
    return np.array([r["loss"] for r in records])


def test_training_lowers_the_loss(setup, tmp_path):
    model, params, _, encoded = setup
    # random base weights: adapt every kernel (lm_head included) so the adapter can move the output
    adapted = jpeft.apply(params, "lora", key=jax.random.key(1), targets=r".*/kernel", r=4, dropout=0.0)
    trained, records = train.fit(model, adapted, encoded, CONFIG, str(tmp_path), max_steps=24, log_every=1, progress=False)
    loss = losses(records)
    assert len(loss) == 24 and loss[-3:].mean() < loss[:3].mean() - 0.5
    assert os.path.exists(tmp_path / "adapter" / "adapter.safetensors")
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(json.loads(lines[0]))


def test_stop_and_resume_equals_uninterrupted(setup, tmp_path):
    model, params, _, encoded = setup
    adapted = jpeft.apply(params, "shoft", key=jax.random.key(2), r_u=2, r_v=2)
    kwargs = dict(max_steps=7, log_every=1, checkpoint_every=2, progress=False)
    full, full_log = train.fit(model, adapted, encoded, CONFIG, str(tmp_path / "a"), **kwargs)
    _, first = train.fit(model, adapted, encoded, CONFIG, str(tmp_path / "b"), stop_at=4, **kwargs)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    resumed, rest = train.fit(model, adapted, encoded, CONFIG, str(tmp_path / "b"), **kwargs)
    assert [r["step"] for r in rest] == [5, 6, 7]  # steps 3 (epoch 1 begins) onwards come from the checkpoint
    np.testing.assert_allclose(losses(first + rest), losses(full_log), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(full)[0]), jax.tree_util.tree_leaves(jpeft.partition(resumed)[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(setup):
    model, params, _, encoded = setup
    adapted = perturb(jpeft.apply(params, "dora", key=jax.random.key(3), r=2, dropout=0.0), jax.random.key(4), 0.05)
    trainable, frozen = jpeft.partition(adapted)
    batch = {k: jnp.asarray(v) for k, v in data.collate(encoded, list(range(4))).items()}
    out = []
    for accum in (1, 2):
        tx = train.optimizer(CONFIG, 10)
        step = train.make_train_step(train.lm_loss_fn(model), tx, accum)
        state, metrics = step(train.init_state(trainable, tx, 0), frozen, batch)
        out.append((float(metrics["loss"]), state.trainable))
    assert abs(out[0][0] - out[1][0]) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(out[0][1]), jax.tree_util.tree_leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_export_roundtrip(setup, tmp_path, method):
    _, params, _, _ = setup
    hp = {"oft": dict(block_size=8), "boft": dict(block_size=4, n_butterfly=2), "rhoft": dict(k=8, r_u=2, r_v=2)}.get(method, {})
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(5), **hp), jax.random.key(6))
    checkpoint.save_adapter(tmp_path, adapted)
    size = os.path.getsize(tmp_path / "adapter.safetensors")
    if method in ("lora", "dora", "lokr", "oft", "boft"):  # the base kernels are not in it
        assert size < 4 * sum(x.size for x in jax.tree_util.tree_leaves(params)) / 4
    restored = checkpoint.load_adapter(tmp_path, params)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.materialize(adapted)), jax.tree_util.tree_leaves(jpeft.materialize(restored))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no jpeft node"):
        checkpoint.save_adapter(tmp_path / "x", params)


def test_scoring_picks_the_answer_the_model_prefers(setup):
    """A model whose next-token distribution ignores its input and puts almost all mass on
    one token: choices made of that token must win, and the scores must equal the sums
    of log-probabilities computed by hand."""
    model, params, tok, _ = setup
    favored = tok.encode(" the", add_special_tokens=False)
    assert len(favored) == 1
    head = params["lm_head"]
    bias = jnp.zeros_like(head["bias"]).at[favored[0]].set(12.0)
    rigged = {**params, "lm_head": {"kernel": jnp.zeros_like(head["kernel"]), "bias": bias}}
    examples = [
        data.Example("Pick one:", ("cat", "the the"), 1, "toy", "toy:0"),
        data.Example("Pick one:", ("the", "dog"), 0, "toy", "toy:1"),
        data.Example("Pick one:", ("bird", "the the the", "fish"), 1, "toy", "toy:2"),
    ]
    result = evaluation.evaluate(model, rigged, examples, tok, batch_size=4, max_length=32)
    assert result["accuracy"] == 1.0 and result["n"] == 3
    logp = jax.nn.log_softmax(bias)
    for ex, pred in zip(examples, result["predictions"]):
        for choice, score in zip(ex.choices, pred["scores"]):
            ids = tok.encode(" " + choice, add_special_tokens=False)
            np.testing.assert_allclose(score, sum(float(logp[i]) for i in ids), rtol=1e-5, atol=1e-5)
    # Length normalization divides by characters: four cheap tokens lose on the sum
    # (-4ε vs -ε) but win per character (-4ε/15 vs -ε/3).
    flip = [data.Example("Pick one:", ("the the the the", "the"), 0, "toy", "toy:3")]
    res = evaluation.evaluate(model, rigged, flip, tok, batch_size=4, max_length=32)
    assert (res["predictions"][0]["prediction"], res["predictions"][0]["prediction_norm"]) == (1, 0)
    assert (res["accuracy"], res["accuracy_norm"]) == (0.0, 1.0)


def test_interrupted_run_keeps_its_last_step(setup, tmp_path, monkeypatch):
    """Ctrl-C in the middle of an epoch: the completed steps are checkpointed, and a new
    run in the same directory continues from there."""
    model, params, _, encoded = setup
    adapted = jpeft.apply(params, "oft", key=jax.random.key(7), block_size=8)
    real_batches = data.batches

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train.data, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.fit(model, adapted, encoded, CONFIG, str(tmp_path), max_steps=5, checkpoint_every=100, progress=False)
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    monkeypatch.setattr(train.data, "batches", real_batches)
    _, records = train.fit(model, adapted, encoded, CONFIG, str(tmp_path), max_steps=5, log_every=1, progress=False)
    assert [r["step"] for r in records] == [3, 4, 5]


def test_cli_trains_on_llm_adapters_instructions(tmp_path):
    from jpeft import cli

    cli.main(["train", "--model", "tiny", "--method", "lora", "--tasks", "boolq", "--dtype", "float32", "--batch-size", "4",
              "--max-length", "192", "--steps", "3", "--log-every", "1", "--run-dir", str(tmp_path),
              "--instructions", str(data.ASSETS / "sample_data" / "commonsense_mini.json")])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert json.loads((tmp_path / "run.json").read_text())["instructions"].endswith("commonsense_mini.json")


def test_target_logprobs_equal_log_softmax():
    logits = 30.0 * jax.random.normal(jax.random.key(0), (2, 5, 50))  # large logits: stability matters
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 50)
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(train.target_logprobs(logits, targets), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_keeps_loss_and_gradients(setup, remat):
    """Rematerialization trades memory for recomputation; the numbers stay the same,
    with adapter and attention/residual dropout on (the same masks are redrawn)."""
    model, params, _, encoded = setup
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(5), r=2, dropout=0.1), jax.random.key(6), 0.05)
    trainable, frozen = jpeft.partition(adapted)
    batch = {k: jnp.asarray(v) for k, v in data.collate(encoded, list(range(4))).items()}
    dropping = model.clone(spec=dataclasses.replace(model.spec, attention_dropout=0.1, resid_pdrop=0.1))

    def value_and_grad(m):
        loss = train.lm_loss_fn(m)
        fn = lambda t: loss(jpeft.combine(t, frozen), batch, jax.random.key(7))[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(trainable)

    (v0, g0), (v1, g1) = value_and_grad(dropping), value_and_grad(dropping.clone(remat=remat))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        assert rel_err(a, b) < 1e-5  # float32 reassociation only; a different dropout mask gives O(1)
    with pytest.raises(ValueError, match="remat must be one of"):
        train.TrainConfig(remat="some")
    with pytest.raises(ValueError, match="remat must be one of"):
        phi.make_model(SMALL, remat="some")
