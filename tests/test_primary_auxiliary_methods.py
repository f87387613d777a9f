"""metabalance, gcs and tuning_free_decay against float64 NumPy oracles."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtgrad

RNG = np.random.default_rng(20260512)


def _tree(task_matrix_a: np.ndarray, task_matrix_b: np.ndarray) -> dict:
  """Two leaves: ``a`` ``[T, 3, 2]`` and ``b`` ``[T, 4]`` from ``[T, 6]`` and ``[T, 4]``."""
  t = task_matrix_a.shape[0]
  return {
    "a": jnp.asarray(task_matrix_a.reshape(t, 3, 2), jnp.float32),
    "b": jnp.asarray(task_matrix_b, jnp.float32),
  }


PARAMS = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}


@functools.cache
def _stepper(factory, **kwargs):
  tx = factory(**kwargs)
  return jax.jit(tx.init), jax.jit(tx.update)


def _flat(x) -> np.ndarray:
  return np.asarray(x, np.float64).reshape(-1)


# ------------------------------------------------------------------ metabalance


def _metabalance_oracle(per_leaf_grads, relax, beta, strategy, primary=0):
  """Float64 weights and updates per step; ``per_leaf_grads[step][leaf]`` is ``[T, D]``."""
  num_leaves = len(per_leaf_grads[0])
  t = per_leaf_grads[0][0].shape[0]
  ema = np.zeros((num_leaves, t))
  out = []
  for grads in per_leaf_grads:
    weights = np.ones((num_leaves, t))
    updates = []
    for leaf, g in enumerate(grads):
      ema[leaf] = beta * ema[leaf] + (1 - beta) * np.linalg.norm(g, axis=1)
      for k in range(t):
        if k == primary or ema[leaf, k] == 0:
          continue
        apply = {
          "both": True,
          "reduce": ema[leaf, k] > ema[leaf, primary],
          "enlarge": ema[leaf, k] < ema[leaf, primary],
        }[strategy]
        if apply:
          weights[leaf, k] = 1 - relax + relax * ema[leaf, primary] / ema[leaf, k]
      updates.append(weights[leaf] @ g)
    out.append((weights, updates, ema.copy()))
  return out


@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
def test_metabalance_moves_each_auxiliary_norm_toward_the_primary(strategy):
  # Constant gradients: the averages are (1 - beta^k) ||g_t||, so m_p / m_t
  # is the true norm ratio at every step. Leaf a: auxiliary 1 is 10x the
  # primary, auxiliary 2 is 0.1x; leaf b: the other way round.
  relax = 0.6
  direction = RNG.standard_normal((3, 6))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  a = direction * np.array([[2.0], [20.0], [0.2]])
  direction = RNG.standard_normal((3, 4))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  b = direction * np.array([[3.0], [0.3], [30.0]])
  grads = _tree(a, b)
  init, update = _stepper(mtgrad.metabalance, relax=relax, strategy=strategy, num_tasks=3)
  state = init(PARAMS)
  for _ in range(3):
    updates, state = update(grads, state, PARAMS)
  weights = np.asarray(state.weights, np.float64)  # [2 leaves, 3 tasks]
  for leaf, g in enumerate((a, b)):
    norms = np.linalg.norm(g, axis=1)
    for k in (1, 2):
      scaled = weights[leaf, k] * norms[k]
      larger = norms[k] > norms[0]
      moved = strategy == "both" or (strategy == "reduce") == larger
      expected = (1 - relax) * norms[k] + relax * norms[0] if moved else norms[k]
      np.testing.assert_allclose(scaled, expected, rtol=1e-5)
      # The ratio to the primary moves toward 1 by the relax factor.
      ratio_before, ratio_after = norms[k] / norms[0], scaled / norms[0]
      if moved:
        np.testing.assert_allclose(ratio_after - 1, (1 - relax) * (ratio_before - 1), rtol=1e-5)
    np.testing.assert_array_equal(weights[leaf, 0], 1.0)
  np.testing.assert_allclose(_flat(updates["a"]), weights[0] @ a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(updates["b"]), weights[1] @ b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["both", "reduce"])
def test_metabalance_moving_average_matches_numpy_over_steps(strategy):
  relax, beta = 0.7, 0.8
  steps = []
  for _ in range(5):
    scales = 10.0 ** RNG.uniform(-2, 2, size=(3, 1))
    steps.append([RNG.standard_normal((3, 6)) * scales, RNG.standard_normal((3, 4)) * scales])
  oracle = _metabalance_oracle(steps, relax, beta, strategy)
  init, update = _stepper(
    mtgrad.metabalance, relax=relax, beta=beta, strategy=strategy, num_tasks=3
  )
  state = init(PARAMS)
  for (a, b), (weights, (ua, ub), ema) in zip(steps, oracle, strict=True):
    updates, state = update(_tree(a, b), state, PARAMS)
    np.testing.assert_allclose(state.weighting_state.norm_ema, ema, rtol=1e-5)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-5)
    np.testing.assert_allclose(_flat(updates["a"]), ua, rtol=1e-5, atol=1e-5 * np.abs(ua).max())
    np.testing.assert_allclose(_flat(updates["b"]), ub, rtol=1e-5, atol=1e-5 * np.abs(ub).max())


def test_metabalance_whole_model_block_uses_global_norms():
  a, b = RNG.standard_normal((2, 6)), RNG.standard_normal((2, 4)) * np.array([[1.0], [5.0]])
  tx = mtgrad.metabalance(relax=0.5, beta=0.0, blocks=None, num_tasks=2)
  updates, state = tx.update(_tree(a, b), tx.init(PARAMS), PARAMS)
  full = np.concatenate([a, b], axis=1)
  norms = np.linalg.norm(full, axis=1)
  factor = 0.5 + 0.5 * norms[0] / norms[1]
  np.testing.assert_allclose(state.weights, [1.0, factor], rtol=1e-5)
  np.testing.assert_allclose(_flat(updates["b"]), b[0] + factor * b[1], rtol=1e-5, atol=1e-6)


def test_metabalance_zero_gradient_on_a_leaf_is_finite():
  a = RNG.standard_normal((3, 6))
  b = RNG.standard_normal((3, 4))
  a[1] = 0.0  # auxiliary 1 has no gradient on leaf a
  b[0] = 0.0  # the primary has no gradient on leaf b (an auxiliary head)
  init, update = _stepper(mtgrad.metabalance, relax=0.7, num_tasks=3)
  state = init(PARAMS)
  for _ in range(2):
    updates, state = update(_tree(a, b), state, PARAMS)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))
  weights = np.asarray(state.weights)
  assert weights[0, 1] == 1.0  # m_t = 0: left alone
  np.testing.assert_allclose(weights[1, 1:], 0.3, rtol=1e-6)  # m_p = 0: 1 - relax
  np.testing.assert_allclose(_flat(updates["b"]), 0.3 * (b[1] + b[2]), rtol=1e-5)
  zero, _ = update(_tree(np.zeros((3, 6)), np.zeros((3, 4))), init(PARAMS), PARAMS)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


def test_metabalance_enlarge_leaves_auxiliary_heads_alone():
  b = RNG.standard_normal((2, 4))
  b[0] = 0.0
  tx = mtgrad.metabalance(strategy="enlarge", num_tasks=2)
  updates, _ = tx.update(_tree(RNG.standard_normal((2, 6)), b), tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(_flat(updates["b"]), b[1], rtol=1e-6)


def test_metabalance_state_is_a_checkpointable_pytree():
  steps = [_tree(RNG.standard_normal((3, 6)), RNG.standard_normal((3, 4))) for _ in range(3)]
  init, update = _stepper(mtgrad.metabalance, relax=0.7, num_tasks=3)
  state = init(PARAMS)
  _, state = update(steps[0], state, PARAMS)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])  # host copy
  for grads in steps[1:]:
    expected, state = update(grads, state, PARAMS)
    got, restored = update(grads, restored, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert state.weighting_state.norm_ema.shape == (2, 3)


def test_metabalance_primary_index_and_arguments():
  a, b = RNG.standard_normal((3, 6)), RNG.standard_normal((3, 4))
  tx = mtgrad.metabalance(relax=1.0, beta=0.0, primary=2, blocks=None, num_tasks=3)
  _, state = tx.update(_tree(a, b), tx.init(PARAMS), PARAMS)
  norms = np.linalg.norm(np.concatenate([a, b], axis=1), axis=1)
  np.testing.assert_allclose(state.weights, [norms[2] / norms[0], norms[2] / norms[1], 1.0], 1e-5)
  with pytest.raises(ValueError, match="num_tasks"):
    mtgrad.metabalance()
  with pytest.raises(ValueError, match="strategy"):
    mtgrad.metabalance(strategy="shrink", num_tasks=2)
  with pytest.raises(ValueError, match="out of range"):
    mtgrad.metabalance(primary=2, num_tasks=2)
  with pytest.raises(ValueError, match="primary"):
    mtgrad.metabalance(primary=[0], num_tasks=2)
  with pytest.raises(ValueError, match="relax"):
    mtgrad.metabalance(relax=1.5, num_tasks=2)
  with pytest.raises(ValueError, match="beta"):
    mtgrad.metabalance(beta=1.0, num_tasks=2)


# ------------------------------------------------------------------ gcs


def _gcs_oracle(matrix: np.ndarray, primary: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  norms = np.linalg.norm(matrix, axis=1)
  cos = matrix @ matrix[primary] / np.where(norms * norms[primary] > 0, norms * norms[primary], 1)
  weights = (cos > 0).astype(float) if mode == "mask" else np.maximum(cos, 0)
  weights[primary] = 1.0
  return weights, weights @ matrix


def test_gcs_drops_an_auxiliary_gradient_opposed_to_the_primary():
  g = RNG.standard_normal(10)
  aligned = 0.5 * g + RNG.standard_normal(10) * 0.1
  opposed = -3.0 * g + RNG.standard_normal(10) * 0.1
  matrix = np.stack([g, opposed, aligned])
  for mode in ("mask", "weighted"):
    tx = mtgrad.gcs(primary=0, mode=mode, num_tasks=3)
    grads = {"w": jnp.asarray(matrix, jnp.float32)}
    updates, state = tx.update(grads, tx.init({"w": jnp.zeros(10)}))
    assert state.weights[1] == 0.0
    assert state.weights[2] > 0.9
    weights, expected = _gcs_oracle(matrix, 0, mode)
    np.testing.assert_allclose(state.weights, weights, rtol=1e-5)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("primary", [0, 2])
def test_gcs_weighted_matches_numpy(primary):
  init, update = _stepper(mtgrad.gcs, primary=primary, mode="weighted", num_tasks=4)
  for _ in range(4):
    # Scales far apart: the cosines must not depend on them.
    matrix = RNG.standard_normal((4, 10)) * 10.0 ** RNG.uniform(-15, 15, size=(4, 1))
    a, b = matrix[:, :6], matrix[:, 6:]
    updates, state = update(_tree(a, b), init(PARAMS), PARAMS)
    weights, expected = _gcs_oracle(matrix, primary, "weighted")
    np.testing.assert_allclose(state.weights, weights, rtol=2e-5, atol=1e-6)
    got = np.concatenate([_flat(updates["a"]), _flat(updates["b"])])
    scale = np.abs(weights) @ np.linalg.norm(matrix, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_gcs_blockwise_gates_each_leaf():
  g_a, g_b = RNG.standard_normal(6), RNG.standard_normal(4)
  a = np.stack([g_a, -g_a])  # opposed on leaf a
  b = np.stack([g_b, 2 * g_b])  # aligned on leaf b
  tx = mtgrad.gcs(blocks="leaf", num_tasks=2)
  updates, state = tx.update(_tree(a, b), tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(state.weights, [[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(_flat(updates["a"]), g_a, rtol=1e-6)
  np.testing.assert_allclose(_flat(updates["b"]), 3 * g_b, rtol=1e-6)


def test_gcs_zero_primary_gradient_is_finite():
  matrix = np.stack([np.zeros(10), RNG.standard_normal(10), np.zeros(10)])
  for mode in ("mask", "weighted"):
    tx = mtgrad.gcs(mode=mode, num_tasks=3)
    updates, state = tx.update(_tree(matrix[:, :6], matrix[:, 6:]), tx.init(PARAMS), PARAMS)
    assert np.all(np.isfinite(np.asarray(state.weights)))
    # cos = 0 with a zero primary: the auxiliary gradient is dropped.
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates))


def test_gcs_arguments():
  with pytest.raises(ValueError, match="mode"):
    mtgrad.gcs(mode="soft")
  with pytest.raises(ValueError, match="out of range"):
    mtgrad.gcs(primary=3, num_tasks=3)
  tx = mtgrad.gcs(primary=3)  # T known only at trace time
  with pytest.raises(ValueError, match="out of range"):
    tx.update(_tree(np.ones((3, 6)), np.ones((3, 4))), tx.init(PARAMS), PARAMS)


# ------------------------------------------------------------------ tuning_free_decay


def _decay_oracle(g: np.ndarray, theta: np.ndarray, decoupled: bool) -> np.ndarray:
  dot, sq = g @ theta, theta @ theta
  if sq == 0:
    return g
  if decoupled:
    return g - max(dot, 0.0) / sq * theta
  return g + max(-dot, 0.0) / sq * theta


def _split(vector: np.ndarray) -> dict:
  return {"a": jnp.asarray(vector[:6].reshape(3, 2), jnp.float32), "b": jnp.asarray(vector[6:])}


@pytest.mark.parametrize("decoupled", [False, True])
def test_tuning_free_decay_matches_numpy_and_removes_norm_growth(decoupled):
  tx = mtgrad.tuning_free_decay(decoupled=decoupled)
  update = jax.jit(tx.update)
  for sign in (-1.0, 1.0):  # conflicting with the decay, then not
    theta = RNG.standard_normal(10)
    g = RNG.standard_normal(10)
    g = g if np.sign(g @ theta) == sign else -g
    updates, _ = update(_split(g), tx.init(_split(theta)), _split(theta))
    got = np.concatenate([_flat(updates["a"]), _flat(updates["b"])])
    np.testing.assert_allclose(got, _decay_oracle(g, theta, decoupled), rtol=1e-5, atol=1e-6)
    inner = got @ theta
    tol = 1e-5 * np.linalg.norm(g) * np.linalg.norm(theta)
    if decoupled:
      assert inner <= tol  # the update (added to theta) does not grow ||theta||
    else:
      assert inner >= -tol  # the gradient (descent = -u) does not grow ||theta||
    conflicting = (sign > 0) if decoupled else (sign < 0)
    if not conflicting:
      np.testing.assert_array_equal(got, np.asarray(np.float32(g), np.float64))


def test_tuning_free_decay_per_leaf():
  theta, g = RNG.standard_normal(10), RNG.standard_normal(10)
  g[:6] = -theta[:6]  # shrinks leaf a (with descent -g, it grows it)
  g[6:] = theta[6:] + 0.1 * RNG.standard_normal(4)  # shrinks leaf b
  tx = mtgrad.tuning_free_decay(blocks="leaf")
  updates, _ = tx.update(_split(g), tx.init(_split(theta)), _split(theta))
  np.testing.assert_allclose(_flat(updates["a"]), _decay_oracle(g[:6], theta[:6], False), atol=1e-6)
  np.testing.assert_allclose(_flat(updates["b"]), g[6:], rtol=1e-6)
  assert _flat(updates["a"]) @ theta[:6] >= -1e-5


def test_tuning_free_decay_zero_params_nan_and_dtypes():
  tx = mtgrad.tuning_free_decay()
  g = {"w": jnp.array([1.0, -2.0])}
  zero = {"w": jnp.zeros(2)}
  out, _ = tx.update(g, tx.init(zero), zero)
  np.testing.assert_array_equal(out["w"], g["w"])
  theta = {"w": jnp.array([1.0, 1.0])}
  out, _ = tx.update({"w": jnp.array([jnp.nan, 0.0])}, tx.init(theta), theta)
  assert np.isnan(np.asarray(out["w"])).all()
  bf16 = {"w": jnp.array([-1.0, 0.5], jnp.bfloat16)}
  out, _ = tx.update(bf16, tx.init(theta), theta)
  assert out["w"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="params"):
    tx.update(g, tx.init(theta))


def test_tuning_free_decay_in_a_chain_after_a_balancer():
  # A primary task that pulls the weights outward; with SGD the norm grows by
  # eta^2 ||u||^2 only (second order), not by the first-order 2 eta |<u, theta>|.
  theta = {"w": jnp.array([1.0, 0.5, -0.5])}

  def losses(params):
    w = params["w"]
    return jnp.stack([-jnp.sum(w * jnp.array([1.0, 1.0, -1.0])), jnp.sum((w - 0.2) ** 2)])

  eta = 0.01
  tx = optax.chain(mtgrad.min_norm(primary=0), mtgrad.tuning_free_decay(), optax.sgd(eta))
  plain = optax.chain(mtgrad.min_norm(primary=0), optax.sgd(eta))
  values, grads = mtgrad.value_and_jacobian(losses)(theta)
  updates, _ = tx.update(grads, tx.init(theta), theta, losses=values)
  plain_updates, _ = plain.update(grads, plain.init(theta), theta, losses=values)
  norm = lambda p: float(jnp.sum(p["w"] ** 2))
  grown = norm(optax.apply_updates(theta, updates)) - norm(theta)
  plain_grown = norm(optax.apply_updates(theta, plain_updates)) - norm(theta)
  assert plain_grown > 10 * eta**2  # without the correction: first-order growth
  np.testing.assert_allclose(grown, float(jnp.sum(updates["w"] ** 2)), rtol=1e-3)
