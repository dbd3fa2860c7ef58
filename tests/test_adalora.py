"""AdaLoRA: the layer, the orthogonality regularizer and the rank budget against HF PEFT
(float32) and float64 references, the schedule under jit, and training end to end."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint, cli, data, train
from jpeft.methods import adalora
from jpeft.models import phi
from conftest import rel_err

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHAPES = {"q_proj": (48, 32), "v_proj": (48, 24)}  # non-square, two sizes: a transposed mapping cannot pass
R, TARGET_R = 4, 2
SCHEDULE = dict(tinit=2, tfinal=3, deltaT=2, total_step=12)  # budgeting over steps 3..8, final allocation at 9
HP = dict(r=R, target_r=TARGET_R, alpha=8.0, dropout=0.0, **SCHEDULE)
PARTS = {"a": "lora_A", "e": "lora_E", "b": "lora_B"}


def t(x) -> "torch.Tensor":
    return torch.tensor(np.asarray(x, np.float32))


def to_peft(name: str, x) -> "torch.Tensor":
    """A jpeft array in PEFT's layout: ``lora_A = aᵀ``, ``lora_E = e[:, None]``, ``lora_B = bᵀ``."""
    x = np.asarray(x, np.float32)
    return t(x[:, None] if name == "e" else x.T)


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(*SHAPES["q_proj"])
        self.v_proj = torch.nn.Linear(*SHAPES["v_proj"])

    def forward(self, x):
        # PEFT adds the orthogonality regularizer to ``outputs.loss``: expose a zero loss
        return types.SimpleNamespace(loss=0.0 * (self.q_proj(x).sum() + self.v_proj(x).sum()), q=self.q_proj(x))


@pytest.fixture(scope="module")
def setup():
    """Our adapter on both kernels (moved off its start) and PEFT's on the same weights."""
    key = jax.random.key(0)
    tree = {n: {"kernel": jax.random.normal(jax.random.fold_in(key, i), s) / np.sqrt(s[0])} for i, (n, s) in enumerate(SHAPES.items())}
    adapted = jpeft.apply(tree, "adalora", key=jax.random.key(1), targets=".*/kernel", **HP)
    trainable, frozen = jpeft.partition(adapted)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trainable = jax.tree_util.tree_unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    torch.manual_seed(0)
    module = TwoLinears()
    with torch.no_grad():
        for n in SHAPES:
            getattr(module, n).weight.copy_(t(tree[n]["kernel"]).T)
    cfg = peft.AdaLoraConfig(init_r=R, target_r=TARGET_R, lora_alpha=8, lora_dropout=0.0, target_modules=list(SHAPES),
                             **SCHEDULE)
    model = peft.get_peft_model(module, cfg).base_model  # the AdaLoraModel (its forward adds the regularizer)
    load_into_peft(model, trainable)
    return jpeft.combine(trainable, frozen), model


def load_into_peft(model, trainable):
    with torch.no_grad():
        for n in SHAPES:
            layer = getattr(model.model, n)
            for ours, theirs in PARTS.items():
                getattr(layer, theirs)["default"].copy_(to_peft(ours, trainable[n]["kernel"].trainable[ours]))


def test_config_defaults_and_validation():
    cfg = adalora.AdaloraConfig()
    ref = peft.AdaLoraConfig(total_step=100)
    assert (cfg.r, cfg.target_r, cfg.alpha) == (ref.init_r, ref.target_r, ref.lora_alpha)
    assert (cfg.tinit, cfg.tfinal, cfg.deltaT, cfg.beta1, cfg.beta2, cfg.orth_reg_weight) == (
        ref.tinit, ref.tfinal, ref.deltaT, ref.beta1, ref.beta2, ref.orth_reg_weight)
    assert cfg.scale == 8.0 / (12 + 1e-5)
    bad = [
        (dict(r=0), "r must be a positive integer, got 0"),
        (dict(r=4, target_r=6), "target_r=6 exceeds the initial rank r=4"),
        (dict(beta1=1.0), r"beta1 must be in \(0, 1\), got 1.0"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight must be a number >= 0, got -0.1"),
        (dict(deltaT=0), "deltaT must be a positive integer, got 0"),
        (dict(tinit=5, tfinal=5, total_step=10), "tinit=5 \\+ tfinal=5 leaves no budgeting phase in total_step=10"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            adalora.AdaloraConfig(**kwargs)
    with pytest.raises(ValueError, match="r=12 exceeds min"):
        jpeft.apply({"q_proj": {"kernel": jnp.zeros((8, 16))}}, "adalora", key=jax.random.key(0), targets="q_proj/kernel")
    # total_step comes from the run, and the run must leave a budgeting phase
    tree = jpeft.apply({"q_proj": {"kernel": jnp.zeros((16, 16))}}, "adalora", key=jax.random.key(0),
                       targets="q_proj/kernel", r=4, target_r=2, tinit=3, tfinal=2)
    assert adalora.prepare(tree, 6)["q_proj"]["kernel"].config.total_step == 6
    with pytest.raises(ValueError, match="adalora with the run's 5 steps: tinit=3 \\+ tfinal=2 leaves no budgeting"):
        adalora.prepare(tree, 5)


def test_layer_matches_peft_and_float64(setup):
    """Same A, E, B: same outputs and gradients (x, A, E, B) as PEFT's SVDLinear, on both paths."""
    adapted, model = setup
    node = adapted["q_proj"]["kernel"]
    tr, fr = jpeft.partition(node)
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, SHAPES["q_proj"][0])))

    def loss(tr, x, path):
        y = jpeft.linear(x, jpeft.combine(tr, fr), path=path)
        return jnp.sum(jnp.sin(y)), y

    layer = model.model.q_proj
    xt = t(x).requires_grad_(True)
    y_peft = layer(xt) - layer.base_layer.bias  # our node has no bias
    torch.sin(y_peft).sum().backward()
    g_peft = {ours: getattr(layer, theirs)["default"].grad.numpy() for ours, theirs in PARTS.items()}
    for path in ("factored", "materialized"):
        (_, y), (g, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(tr, x, path)
        # relative to each array's norm: E's gradient entries are sums that cancel to 1e-2 of their terms
        assert rel_err(y, y_peft.detach().numpy()) < 1e-6
        assert rel_err(gx, xt.grad.numpy()) < 1e-5
        for k in PARTS:
            assert rel_err(to_peft(k, g.trainable[k]).numpy(), g_peft[k]) < 1e-5, k
    for p in layer.parameters():
        p.grad = None
    # float64 reference of K' = K + alpha / (r + 1e-5) · (a ⊙ e) b
    a, e, b = (np.asarray(node.trainable[k], np.float64) for k in "aeb")
    expected = np.asarray(node.frozen["kernel"], np.float64) + 8.0 / (R + 1e-5) * (a * e) @ b
    np.testing.assert_allclose(jpeft.materialize({"k": node})["k"], expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(jnp.asarray(expected) - node.frozen["kernel"]).max()) > 0.1  # the update is not negligible


def test_identity_at_init_and_phi_qkv_count():
    shapes = {"model": {f"layers_{i}": {"self_attn": {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)}
                                                      for n in ("q_proj", "k_proj", "v_proj")}} for i in range(24)}}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, "adalora", key=jax.random.key(0)), shapes)
    assert jpeft.count_params(abstract)["trainable"] == 72 * (12 * 2048 + 12 + 2048 * 12) == 3_539_808
    node = jpeft.apply({"q": {"kernel": jnp.ones((64, 32))}}, "adalora", key=jax.random.key(0), targets="q/kernel")["q"]["kernel"]
    assert float(jnp.std(node.trainable["a"])) == pytest.approx(0.02, rel=0.1) and not np.any(node.trainable["e"])


def test_regularizer_matches_peft_and_float64(setup):
    adapted, model = setup
    trainable, _ = jpeft.partition(adapted)
    load_into_peft(model, trainable)
    ours = float(adalora.regularizer(trainable))
    with torch.no_grad():
        theirs = float(model(t(np.zeros((1, 48)))).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    norms = []
    for n in SHAPES:
        a, b = (np.asarray(trainable[n]["kernel"].trainable[k], np.float64) for k in "ab")
        norms += [np.linalg.norm(a.T @ a - np.eye(R)), np.linalg.norm(b @ b.T - np.eye(R))]
    assert ours == pytest.approx(0.5 * np.mean(norms), rel=1e-5) and ours > 0.1
    # its gradient is finite where a Gram matrix is exactly the identity (torch.norm's zero subgradient)
    eye = jax.tree_util.tree_map(lambda x: x, trainable)
    node = eye["q_proj"]["kernel"]
    eye["q_proj"]["kernel"] = node.replace(trainable={**node.trainable, "a": jnp.eye(48, R)})
    g = jax.grad(adalora.regularizer)(eye)["q_proj"]["kernel"].trainable["a"]
    assert bool(jnp.all(jnp.isfinite(g))) and not np.any(g)


def test_budget_schedule_matches_peft_at_every_step(setup):
    _, model = setup
    allocator = model.rankallocator
    nodes = adalora.adalora_nodes(setup[0])
    init_budget, target_budget = adalora.budgets(nodes)
    assert (init_budget, target_budget) == (allocator.init_bgt, allocator.target_bgt) == (2 * R, 2 * TARGET_R)
    config = nodes[0].config
    for step in range(0, 15):
        assert adalora.budget_schedule(config, step, init_budget, target_budget) == allocator.budget_schedule(step), step
    budget, mask = adalora._schedule_table(config, init_budget, target_budget)
    assert list(budget) == [8, 8, 8, 6, 5, 4, 4, 4, 4, 4] and list(np.flatnonzero(mask)) == [4, 6, 8, 9]


def random_state(key, trainable):
    """Importance state with distinct positive values (no ties at the threshold)."""
    state = adalora.init_state(trainable)
    leaves, treedef = jax.tree_util.tree_flatten({"exp_avg_ipt": state["exp_avg_ipt"], "exp_avg_unc": state["exp_avg_unc"]})
    keys = jax.random.split(key, len(leaves))
    filled = jax.tree_util.tree_unflatten(treedef, [jax.random.uniform(k, x.shape, minval=0.1, maxval=1.0) for x, k in zip(leaves, keys)])
    keep = [jnp.arange(R) % 2 == 0 for _ in state["keep"]]  # an earlier allocation: ranks 0 and 2 kept
    return {**state, **filled, "keep": keep}


@pytest.mark.parametrize("step", [1, 4, 5, 9, 11])  # warm-up, mask step, no mask (deltaT=2), final allocation, after it
def test_update_and_allocate_matches_peft(setup, step):
    """One ``AdaLoraModel.update_and_allocate(step)`` from the same parameters, gradients and
    importance state: the same importance update, budget, pruned E and allocation."""
    adapted, model = setup
    trainable, _ = jpeft.partition(adapted)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    grads = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    state = random_state(jax.random.key(step), trainable)

    load_into_peft(model, trainable)
    allocator = model.rankallocator
    allocator.reset_ipt()
    config = model.peft_config["default"]
    config.rank_pattern = {f"{n}.lora_E.default": [bool(v) for v in np.asarray(k)] for n, k in zip(SHAPES, state["keep"])}
    for i, n in enumerate(SHAPES):
        layer = getattr(model.model, n)
        for ours, theirs in PARTS.items():
            name = f"{n}.{theirs}.default"
            getattr(layer, theirs)["default"].grad = to_peft(ours, grads[n]["kernel"].trainable[ours])
            allocator.ipt[name] = torch.zeros_like(getattr(layer, theirs)["default"])
            allocator.exp_avg_ipt[name] = to_peft(ours, state["exp_avg_ipt"][i][ours])
            allocator.exp_avg_unc[name] = to_peft(ours, state["exp_avg_unc"][i][ours])
    model.update_and_allocate(step)

    new, new_state = jax.jit(adalora.after_step)(state, trainable, grads, step)
    budget = allocator.budget_schedule(step)[0]
    assert int(new_state["budget"]) == budget
    pruned = 0
    for i, n in enumerate(SHAPES):
        e_peft = getattr(model.model, n).lora_E["default"].detach().numpy()
        np.testing.assert_array_equal(to_peft("e", new[n]["kernel"].trainable["e"]).numpy(), e_peft)
        pruned += int(np.sum(e_peft == 0))
        if step < 9:  # importance updated
            for ours, theirs in PARTS.items():
                for field in ("exp_avg_ipt", "exp_avg_unc"):
                    np.testing.assert_allclose(to_peft(ours, new_state[field][i][ours]).numpy(),
                                               getattr(allocator, field)[f"{n}.{theirs}.default"].numpy(), rtol=1e-5, atol=1e-7)
        else:  # PEFT resets it after the final allocation and keeps that allocation
            fields = jax.tree_util.tree_leaves((new_state["exp_avg_ipt"], new_state["exp_avg_unc"]))
            before = jax.tree_util.tree_leaves((state["exp_avg_ipt"], state["exp_avg_unc"]))
            for x, y in zip(fields, before):
                np.testing.assert_array_equal(x, 0 if step == 9 else y)
            np.testing.assert_array_equal(np.asarray(new_state["keep"][i]), config.rank_pattern[f"{n}.lora_E.default"])
    # how many ranks went: by the budget on a mask step, none before, the kept allocation after
    assert pruned == {1: 0, 4: 2 * R - 5, 5: 0, 9: 2 * R - 2 * TARGET_R, 11: R}[step]


def test_jitted_schedule_over_a_run(setup):
    """Steps 1 … 13 of the jitted after_step: every mask step keeps exactly its budget, the
    final allocation keeps target_r per matrix, and later steps re-prune what the optimizer
    revived (here: every e moved off zero before each step)."""
    adapted, _ = setup
    trainable, _ = jpeft.partition(adapted)
    config = adalora.adalora_nodes(trainable)[0].config
    state = adalora.init_state(trainable)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    final_keep = None
    for step in range(1, 14):
        grads = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(jax.random.key(100 * step + i), x.shape)
                                                       for i, x in enumerate(leaves)])
        revived = adalora._replace_e(trainable, [n.trainable["e"] + 0.01 for n in adalora.adalora_nodes(trainable)])
        trainable, state = jax.jit(adalora.after_step)(state, revived, grads, step)
        budget, mask = adalora.budget_schedule(config, step, 2 * R, 2 * TARGET_R)
        rank = sum(int(jnp.count_nonzero(n.trainable["e"])) for n in adalora.adalora_nodes(trainable))
        assert int(state["budget"]) == budget and rank == (budget if mask or step >= 9 else 2 * R), step  # 9: forced
        if step == 9:
            final_keep = [np.asarray(k) for k in state["keep"]]
        if step > 9:  # the final allocation, re-applied
            for keep, node, final in zip(state["keep"], adalora.adalora_nodes(trainable), final_keep):
                np.testing.assert_array_equal(keep, final)
                np.testing.assert_array_equal(np.asarray(node.trainable["e"]) != 0, final)
    assert rank == 2 * TARGET_R and sum(int(k.sum()) for k in final_keep) == 2 * TARGET_R


def test_a_stacked_node_is_one_budget_per_layer(setup):
    """A stacked (L, in, out) node counts L matrices and prunes exactly as L separate kernels."""
    shapes = {"w": jax.ShapeDtypeStruct((3, 48, 32), jnp.float32)}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, "adalora", key=jax.random.key(0), targets="w", layout="sio", **HP), shapes)
    assert adalora.budgets(adalora.adalora_nodes(abstract)) == (3 * R, 3 * TARGET_R)

    adapted, _ = setup
    node = jpeft.partition(adapted)[0]["q_proj"]["kernel"]
    split = {f"l{i}": node.replace(trainable={k: v * (1 + i) for k, v in node.trainable.items()}) for i in range(2)}
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    stacked = {"w": node.replace(trainable=jax.tree_util.tree_map(stack, *(n.trainable for n in split.values())),
                                 layout="sio", kernel_shape=(2, *SHAPES["q_proj"]))}
    grads = {k: n.replace(trainable={p: jnp.sin(7.0 * v) for p, v in n.trainable.items()}) for k, n in split.items()}
    grads_stacked = {"w": stacked["w"].replace(trainable=jax.tree_util.tree_map(stack, *(n.trainable for n in grads.values())))}
    state = random_state(jax.random.key(5), split)
    state_stacked = {name: [jax.tree_util.tree_map(stack, *state[name])] for name in ("exp_avg_ipt", "exp_avg_unc", "keep")}
    state_stacked["budget"] = state["budget"]
    assert adalora.budgets(adalora.adalora_nodes(stacked)) == adalora.budgets(adalora.adalora_nodes(split)) == (2 * R, 2 * TARGET_R)
    new, new_state = adalora.after_step(state, split, grads, 4)  # a mask step: budget 5 of 8
    new_s, new_state_s = adalora.after_step(state_stacked, stacked, grads_stacked, 4)
    e = np.stack([new[f"l{i}"].trainable["e"] for i in range(2)])
    np.testing.assert_array_equal(new_s["w"].trainable["e"], e)
    np.testing.assert_array_equal(new_state_s["keep"][0], np.stack(new_state["keep"]))
    assert int(new_state_s["budget"]) == 5 and np.count_nonzero(e) == 5


# ---------------------------------------------------------------- training end to end


def regression_loss(params, batch, key):
    """A train-step loss (``train.lm_loss_fn``'s contract) on the two adapted kernels alone."""
    err = sum(jnp.sum((jpeft.linear(batch["x"], params[n]["kernel"]) - batch[n]) ** 2) for n in SHAPES)
    return err, jnp.asarray(batch["x"].shape[0], jnp.float32)


def test_train_step_checkpoints_the_importance_and_resumes_exactly(setup, tmp_path):
    """The jitted train step with AdaLoRA's hooks (what ``train.fit`` builds): it prunes
    to the budget, and its state, importance included, saved at step 4 by the run's
    Checkpointer and restored into a fresh template (as ``fit`` resumes), continues bit
    for bit, where forgetting the importance would not."""
    adapted, _ = setup
    hooks = train.method_hooks(adapted)
    assert list(hooks) == ["adalora"] and train.method_hooks(jpeft.materialize(adapted)) == {}
    trainable, frozen = jpeft.partition(hooks["adalora"].prepare(adapted, 99))  # total_step=12 given: kept
    assert adalora.adalora_nodes(trainable)[0].config.total_step == 12
    tx = train.optimizer(train.TrainConfig(learning_rate=1e-2, warmup_steps=0), 12)
    step = train.make_train_step(regression_loss, tx, 1, hooks)
    key = jax.random.key(7)
    batches = [{"x": jax.random.normal(jax.random.fold_in(key, i), (8, 48)),
                **{n: jax.random.normal(jax.random.fold_in(key, 100 + i), (8, s[1])) for n, s in SHAPES.items()}} for i in range(7)]
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
    state, log = train.init_state(trainable, tx, 0, hooks), []
    for i, batch in enumerate(batches):
        state, metrics = step(state, frozen, batch)
        log.append({k: float(v) for k, v in metrics.items()})
        if i == 3:
            saver.save(4, state, {"step": 4})
    config = adalora.adalora_nodes(trainable)[0].config
    schedule = [adalora.budget_schedule(config, r["step"], 2 * R, 2 * TARGET_R) for r in ({"step": i + 1} for i in range(7))]
    assert [r["adalora_budget"] for r in log] == [b for b, _ in schedule] == [8, 8, 6, 5, 4, 4, 4]
    # mask steps keep their budget; in between the optimizer revives pruned entries (PEFT too)
    assert [r["adalora_rank"] for r in log] == [b if m else 2 * R for b, m in schedule] == [8, 8, 8, 5, 8, 4, 8]
    assert all(r["regularizer"] > 0.1 for r in log)

    template = train.init_state(trainable, tx, 0, hooks)
    restored, _ = saver.restore(template)
    saver.close()
    assert restored.hooks["adalora"]["keep"][0].dtype == bool and int(restored.step) == 4
    fresh = jax.tree_util.tree_map(jnp.copy, restored._replace(hooks=template.hooks))  # copies: the step donates
    for batch in batches[4:]:
        restored, _ = step(restored, frozen, batch)
        fresh, _ = step(fresh, frozen, batch)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)
    ipt = lambda s: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s.hooks["adalora"]["exp_avg_ipt"])])  # noqa: E731
    assert rel_err(ipt(fresh), ipt(state)) > 0.05


def test_cli_train_prunes_ranks_to_the_target_budget(tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(["train", "--model", "tiny", "--method", "adalora", "--set", "r=4", "--set", "target_r=2", "--set", "tinit=1",
              "--set", "tfinal=2", "--tasks", "piqa", "--batch-size", "4", "--dtype", "float32", "--max-length", "128",
              "--steps", "8", "--warmup-steps", "0", "--lr", "1e-2", "--log-every", "1", "--run-dir", str(run)])
    assert "piqa" in capsys.readouterr().out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    described = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config = adalora.AdaloraConfig(**next(iter(described.values()))["hparams"])
    assert config.total_step == 8  # filled in from the run
    n = len(described)  # tiny Phi's Q/K/V: 4 layers x 3
    expected = [adalora.budget_schedule(config, r["step"], 4 * n, 2 * n)[0] for r in log]
    assert [r["adalora_budget"] for r in log] == expected == [48, 36, 29, 25, 24, 24, 24, 24]
    assert [r["adalora_rank"] for r in log] == expected  # every step after tinit masks (deltaT=1)
    assert all(np.isfinite(r["loss"]) and r["regularizer"] > 0 for r in log)
    restored = jpeft.tree.leaves_with_paths(checkpoint.load_adapter(run / "adapter", phi.init(phi.config("tiny"), jax.random.key(0))[1]))
    assert sum(int(jnp.count_nonzero(x.trainable["e"])) for _, x in restored if jpeft.is_node(x)) == 2 * n
