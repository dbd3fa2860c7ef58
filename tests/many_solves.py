"""Two training steps with many concurrent in-step solves, for ``test_platform.py``.

Run as ``python tests/many_solves.py CASE``; it prints ``OK`` and the losses. The test runs
it in a subprocess with a timeout, so that a deadlock (jaxlib 0.10's batched CPU LAPACK
kernels hang a step with about ten concurrent calls) fails the test instead of freezing
the suite. Cases:

- ``oft``: a 4-layer, hidden-512 Phi with every linear layer adapted by OFT, block 64:
  24 nodes of 8 Cayley blocks of 64 × 64.
- ``boft``: the same model with BOFT, block 32 and two butterfly factors: 24 nodes of
  2 × 16 blocks of 32 × 32.
- ``vmapped``: 24 batched Cayley transforms and 24 vmapped CWY chains (batched triangular
  solves), as stacked (scanned) layers would run them.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft import linalg, train
from jpeft.models import phi

ALL_LINEAR = r".*/(q_proj|k_proj|v_proj|dense|fc1|fc2)/kernel"
CASES = {"oft": dict(block_size=64), "boft": dict(block_size=32, n_butterfly=2)}


def train_two_steps(method: str) -> list[float]:
    config = {**phi.config("small").to_dict(), "intermediate_size": 512, "vocab_size": 1024}
    model = phi.make_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    adapted = jpeft.apply(params, method, key=jax.random.key(1), targets=ALL_LINEAR, **CASES[method])
    assert len(jpeft.match_targets(params, ALL_LINEAR)) == 24
    trainable, frozen = jpeft.partition(adapted)
    tx = train.optimizer(train.TrainConfig(batch_size=2, warmup_steps=0, learning_rate=1e-2), 2)
    state = train.init_state(trainable, tx, 0)
    step = train.make_train_step(train.lm_loss_fn(model), tx, 1)
    batch = train.random_lm_batch(jax.random.key(2), 2, 32, 1024)
    losses = []
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(trainable)))
    assert np.all(np.isfinite(losses)) and moved > 0, (losses, moved)
    return losses


def vmapped_solves() -> list[float]:
    qs = [jax.random.normal(jax.random.key(i), (8, 64, 64)) * 0.01 for i in range(24)]
    us = [jax.random.normal(jax.random.key(100 + i), (8, 64, 16)) for i in range(24)]
    x = jax.random.normal(jax.random.key(200), (8, 128, 64))

    def loss(qs, us):
        rotations = sum(jnp.sum(linalg.cayley(q - jnp.swapaxes(q, -1, -2)) ** 2) for q in qs)
        chains = sum(jnp.sum(jax.vmap(linalg.apply_householder)(x, u) ** 2) for u in us)
        return rotations + chains

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qs, us)
    jax.block_until_ready(grads)
    return [float(value)]


if __name__ == "__main__":
    case = sys.argv[1]
    print("OK", vmapped_solves() if case == "vmapped" else train_two_steps(case), flush=True)
