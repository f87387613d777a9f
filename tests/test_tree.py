"""Tree kernels and the builder against float64 NumPy oracles; input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtgrad

from . import harness


def _random_tree(t=4, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = harness.TREE_SHAPES["nested"]
  matrix = rng.standard_normal((t, harness.tree_dim(shapes))) * 10.0 ** rng.uniform(-3, 3, (t, 1))
  grads, params = harness.tree_from_matrix(matrix, shapes)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
  return cast(grads), cast(params), harness.flatten_tasks(cast(grads))


def test_gram_matches_float64_oracle():
  grads, _, matrix = _random_tree()
  np.testing.assert_allclose(mtgrad.gram(grads), matrix @ matrix.T, rtol=1e-5)
  np.testing.assert_allclose(mtgrad.sq_norms(grads), np.sum(matrix**2, axis=1), rtol=1e-5)


def test_bfloat16_gram_accumulates_in_float32():
  # 4096 bf16 entries of 1 + 2^-7: a bf16 accumulator would stall at 256.
  grads = {"w": jnp.full((2, 4096), 1.0 + 2.0**-7, jnp.bfloat16)}
  g = mtgrad.gram(grads)
  assert g.dtype == jnp.float32
  expected = 4096 * (1.0 + 2.0**-7) ** 2
  np.testing.assert_allclose(g, np.full((2, 2), expected), rtol=1e-6)
  combined = mtgrad.combine(grads, jnp.array([0.5, 0.5]))
  assert combined["w"].dtype == jnp.bfloat16


def test_float64_inputs_stay_float64():
  with jax.enable_x64(True):
    grads, _, matrix = _random_tree(dtype=jnp.float64)
    g = mtgrad.gram(grads)
    assert g.dtype == jnp.float64
    np.testing.assert_allclose(g, matrix @ matrix.T, rtol=1e-12)


def test_block_gram_sums_to_gram_and_matches_per_leaf_oracle():
  grads, _params, _ = _random_tree()
  blocks = mtgrad.block_gram(grads, "leaf")
  leaves = jax.tree.leaves(grads)
  assert blocks.shape == (len(leaves), 4, 4)
  for b, leaf in zip(blocks, leaves, strict=True):
    rows = np.asarray(leaf, np.float64).reshape(4, -1)
    np.testing.assert_allclose(b, rows @ rows.T, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(blocks.sum(0), mtgrad.gram(grads), rtol=1e-5)
  np.testing.assert_allclose(
    mtgrad.block_sq_norms(grads, "leaf"), jnp.diagonal(blocks, axis1=1, axis2=2), rtol=1e-6
  )


def test_user_grouping_of_leaves():
  grads, params, _ = _random_tree()
  labels = {
    "dense": {"kernel": "trunk", "bias": "trunk"},
    "scale": "head",
    "heads": ["head", ("trunk",)],
  }
  ids, names = mtgrad.block_ids(labels, params)
  assert names == ("trunk", "head")
  grams = mtgrad.block_gram(grads, labels)
  per_leaf = mtgrad.block_gram(grads, "leaf")
  np.testing.assert_allclose(grams[0], per_leaf[np.array(ids) == 0].sum(0), rtol=1e-6)
  callable_labels = lambda p: jax.tree.map(lambda x: "big" if x.size > 2 else "small", p)
  assert mtgrad.block_ids(callable_labels, params)[1] == ("small", "big")


def test_combine_matches_oracle_globally_and_per_block():
  grads, _params, matrix = _random_tree()
  w = jnp.array([0.3, -1.0, 2.0, 0.5])
  np.testing.assert_allclose(
    harness.flatten_update(mtgrad.combine(grads, w)), np.asarray(w) @ matrix, rtol=1e-5, atol=1e-3
  )
  leaves = jax.tree.leaves(grads)
  w_blocks = jnp.arange(len(leaves) * 4, dtype=jnp.float32).reshape(len(leaves), 4)
  out = jax.tree.leaves(mtgrad.combine(grads, w_blocks, blocks="leaf"))
  for i, (o, leaf) in enumerate(zip(out, leaves, strict=True)):
    np.testing.assert_allclose(
      o, np.tensordot(np.asarray(w_blocks[i]), np.asarray(leaf), 1), rtol=1e-5
    )


def test_block_wise_builder_equals_per_leaf_runs():
  grads, params, _ = _random_tree()
  tx = mtgrad.inverse_norm(blocks="leaf", num_tasks=4)
  updates, state = tx.update(grads, tx.init(params), params)
  assert state.weights.shape == (len(jax.tree.leaves(params)), 4)
  for leaf_g, leaf_p, leaf_u in zip(
    jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(updates), strict=True
  ):
    single = mtgrad.inverse_norm()
    expected, _ = single.update({"x": leaf_g}, single.init({"x": leaf_p}))
    np.testing.assert_allclose(leaf_u, expected["x"], rtol=1e-6)


def test_block_wise_stateful_and_stochastic_weightings_get_per_block_state_and_keys():
  def weighting(gram, losses, state, key, *, num_tasks):
    w = jax.random.uniform(key, (num_tasks,)) + state
    return w, state + 1.0

  tx = mtgrad.from_weighting(
    weighting,
    needs="nothing",
    num_tasks=2,
    init_state=lambda t: jnp.zeros(()),
    key=3,
    blocks="leaf",
  )
  grads, params, _ = _random_tree(t=2)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  _, state = tx.update(grads, state, params)
  num_blocks = len(jax.tree.leaves(params))
  np.testing.assert_array_equal(state.weighting_state, np.full(num_blocks, 2.0))
  rows = np.asarray(state.weights)
  assert len({tuple(r) for r in rows}) == num_blocks, "blocks must get distinct keys"


# ------------------------------------------------------------ validation


def test_error_on_disagreeing_task_axes():
  grads = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match=r"disagree.*\['a'\]: T=3.*\['b'\]: T=2"):
    mtgrad.gram(grads)
  tx = mtgrad.mean()
  with pytest.raises(ValueError, match="disagree"):
    tx.update(grads, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)}))


def test_error_on_missing_task_axis_against_params():
  params = {"w": jnp.zeros((3, 2))}
  tx = mtgrad.mean()
  with pytest.raises(
    ValueError, match=r"\['w'\].*task-gradient shape \(3, 2\).*param shape \(3, 2\)"
  ):
    tx.update({"w": jnp.zeros((3, 2))}, tx.init(params), params)
  with pytest.raises(ValueError, match="scalar"):
    tx.update({"w": jnp.zeros(())}, tx.init({"w": jnp.zeros(())}))
  with pytest.raises(ValueError, match="tree structures"):
    tx.update({"v": jnp.zeros((2, 3, 2))}, tx.init(params), params)


def test_error_on_task_count_mismatch():
  tx = mtgrad.mean(num_tasks=3)
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="num_tasks=3.*T=2"):
    tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
  with pytest.raises(ValueError, match="num_tasks=3.*T=2"):
    mtgrad.constant(jnp.ones(3)).update(
      {"w": jnp.zeros((2, 2))}, mtgrad.constant(jnp.ones(3)).init(params)
    )


def test_error_on_non_float_gradients():
  with pytest.raises(ValueError, match="floating point.*int32"):
    mtgrad.num_tasks({"w": jnp.zeros((2, 3), jnp.int32)})
  with pytest.raises(ValueError, match="no leaves"):
    mtgrad.num_tasks({})


def test_errors_are_raised_at_trace_time_under_jit():
  tx = mtgrad.inverse_loss()
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="needs the per-task losses"):
    jax.jit(tx.update)({"w": jnp.zeros((2, 2))}, tx.init(params))


def test_error_on_bad_blocks_and_bad_constructor_args():
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="'leaf'"):
    mtgrad.inverse_norm(blocks="layer").init(params)
  with pytest.raises(ValueError, match="params structure"):
    mtgrad.inverse_norm(blocks={"v": 0}).init(params)
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):
    mtgrad.mean(num_tasks=0)
  with pytest.raises(ValueError, match="shape \\[T\\]"):
    mtgrad.constant(jnp.ones((2, 2)))


def test_chain_forwards_losses_and_state_exposes_weights():
  tx = optax.chain(mtgrad.inverse_loss(num_tasks=2), optax.scale(-1.0))
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.eye(2)}
  updates, state = tx.update(grads, tx.init(params), params, losses=jnp.array([4.0, 0.5]))
  np.testing.assert_allclose(updates["w"], [-0.25, -2.0])
  np.testing.assert_allclose(optax.tree.get(state, "weights"), [0.25, 2.0])
