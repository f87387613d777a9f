"""GradNorm, uncertainty weighting, DWA and GLS against float64 NumPy oracles.

The oracles replay each paper's update rule step by step in float64 NumPy
(Adam written out from its definition, not optax), on the same gradients and
losses the transforms see. Closed-form gradients are checked against
autodiff of the objectives they come from.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtgrad
from mtgrad._src.tree import select_leaves as selected_leaves

from . import harness

SHAPES = {"head": (3,), "trunk": {"b": (2,), "w": (2, 3)}}  # 11 numbers per task


def _tree(matrix):
  return harness.tree_from_matrix(np.asarray(matrix, np.float64), SHAPES)


class _Adam:
  """optax.adam's defaults, from Kingma & Ba's definition, in float64."""

  def __init__(self, lr, size, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.m, self.v, self.k = np.zeros(size), np.zeros(size), 0

  def step(self, grad):
    self.k += 1
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad**2
    m_hat = self.m / (1 - self.b1**self.k)
    v_hat = self.v / (1 - self.b2**self.k)
    return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _scan_weights(tx, losses_seq, params=None):
  """Weights of every step from ``weights_from_losses`` over a loss sequence."""
  params = {"w": jnp.zeros(2)} if params is None else params

  def step(state, losses):
    weights, state = mtgrad.weights_from_losses(tx, state, losses)
    return state, weights

  return jax.lax.scan(step, tx.init(params), jnp.asarray(losses_seq, jnp.float32))


# ------------------------------------------------------------------- GLS


def test_gls_weights_match_the_geometric_mean_formula():
  rng = np.random.default_rng(0)
  for t in (2, 3, 7):
    losses = rng.uniform(0.05, 20.0, t)
    expected = np.prod(losses) ** (1 / t) / (t * losses)
    weights, _ = mtgrad.weights_from_losses(mtgrad.gls(), mtgrad.gls().init({}), losses)
    np.testing.assert_allclose(weights, expected, rtol=2e-6)


def test_gls_is_stable_where_the_product_under_or_overflows():
  # prod L = 1e-400 (T=40) is 0 in float64 itself; the oracle uses log10.
  losses = np.array([1e-10] * 20 + [1e-30] * 20)
  log10_geo = np.mean(np.log10(losses))
  expected = 10.0 ** (log10_geo - np.log10(losses)) / 40
  weights, _ = mtgrad.weights_from_losses(mtgrad.gls(), mtgrad.gls().init({}), losses)
  np.testing.assert_allclose(weights, expected, rtol=2e-5)
  big, _ = mtgrad.weights_from_losses(mtgrad.gls(), mtgrad.gls().init({}), 1e30 * np.ones(5))
  np.testing.assert_allclose(big, 0.2, rtol=1e-6)


def test_gls_update_is_the_gradient_of_the_geometric_mean():
  params = {"w": jnp.array([0.3, -1.2, 2.0])}
  targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, -1.0]])

  def losses_fn(p):
    return jnp.sum((p["w"][None, :] - targets) ** 2, axis=1) * jnp.array([1.0, 100.0, 0.01])

  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  tx = mtgrad.gls(num_tasks=3)
  out, _ = tx.update(grads, tx.init(params), params, losses=losses)
  expected = jax.grad(lambda p: jnp.prod(losses_fn(p)) ** (1 / 3))(params)
  np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5)


def test_gls_zero_and_nan_losses():
  tx = mtgrad.gls(num_tasks=3)
  weights, _ = mtgrad.weights_from_losses(tx, tx.init({}), jnp.array([0.0, 2.0, 3.0]))
  np.testing.assert_array_equal(weights, [0.0, 0.0, 0.0])  # the geometric mean is flat there
  weights, _ = mtgrad.weights_from_losses(tx, tx.init({}), jnp.array([1.0, np.nan, 3.0]))
  assert np.isnan(weights).all()


# ------------------------------------------------------------ uncertainty


def test_uncertainty_weights_converge_to_half_inverse_losses():
  losses = np.array([0.01, 0.3, 1.0, 7.0, 100.0])
  tx = mtgrad.uncertainty(num_tasks=5)
  _, weights = _scan_weights(tx, np.broadcast_to(losses, (6000, 5)))
  np.testing.assert_allclose(weights[0], 0.5)
  np.testing.assert_allclose(weights[-1], 0.5 / losses, rtol=1e-3)
  np.testing.assert_allclose(weights[-1000:], np.broadcast_to(0.5 / losses, (1000, 5)), rtol=1e-2)


def test_uncertainty_matches_adam_on_the_closed_form_gradient():
  rng = np.random.default_rng(1)
  losses_seq = rng.uniform(0.1, 5.0, (30, 3))
  tx = mtgrad.uncertainty(0.05, num_tasks=3)
  state, weights = _scan_weights(tx, losses_seq)
  s, adam = np.zeros(3), _Adam(0.05, 3)
  for k, losses in enumerate(losses_seq.astype(np.float32).astype(np.float64)):
    np.testing.assert_allclose(weights[k], 0.5 * np.exp(-s), rtol=2e-5)
    s = s + adam.step(0.5 * (1 - np.exp(-s) * losses))
  np.testing.assert_allclose(state.weighting_state.log_variances.value, s, rtol=2e-5, atol=1e-6)


def test_uncertainty_closed_form_is_the_kendall_objective_gradient():
  params = {"w": jnp.array([0.5, -1.0])}
  log_var = jnp.array([0.3, -0.7])
  targets = jnp.array([[1.0, 2.0], [-3.0, 0.0]])

  def losses_fn(p):
    return jnp.sum((p["w"][None] - targets) ** 2, axis=1)

  def objective(p, s):
    return jnp.sum(0.5 * (jnp.exp(-s) * losses_fn(p) + s))

  # Plain SGD with step 1: the state moves by minus the gradient in s.
  tx = mtgrad.uncertainty(optimizer=optax.sgd(1.0), num_tasks=2)
  state = tx.init(params)
  state = state._replace(
    weighting_state=mtgrad.UncertaintyState(
      state.weighting_state.log_variances._replace(value=log_var)
    )
  )
  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  out, new_state = tx.update(grads, state, params, losses=losses)
  d_params, d_log_var = jax.grad(objective, argnums=(0, 1))(params, log_var)
  np.testing.assert_allclose(out["w"], d_params["w"], rtol=1e-6)
  np.testing.assert_allclose(
    new_state.weighting_state.log_variances.value, log_var - d_log_var, rtol=1e-6
  )


def test_uncertainty_zero_and_nan_losses():
  tx = mtgrad.uncertainty(0.5, num_tasks=2)
  state, weights = _scan_weights(tx, np.zeros((400, 2)))
  # A zero loss drives s to -inf: the clip keeps the weights finite.
  assert np.all(np.isfinite(weights)) and float(weights[-1, 0]) > 1e30
  np.testing.assert_array_equal(state.weighting_state.log_variances.value, [-80.0, -80.0])
  _, weights = _scan_weights(tx, np.array([[1.0, np.nan], [1.0, 1.0]]))
  assert np.isnan(weights[:, 1]).all() and np.all(np.isfinite(weights[:, 0]))


# -------------------------------------------------------------------- DWA


def _dwa_oracle(losses_seq, temperature, window):
  t = losses_seq.shape[1]
  means, weights = [], []
  for k in range(len(losses_seq)):
    if len(means) < 2:
      weights.append(np.ones(t))
    else:
      r = means[-1] / means[-2]
      e = np.exp(r / temperature - np.max(r / temperature))
      weights.append(t * e / e.sum())
    if (k + 1) % window == 0:
      means.append(losses_seq[k + 1 - window : k + 1].mean(0))
  return np.array(weights)


@pytest.mark.parametrize("window", [1, 3])
def test_dwa_weights_match_the_formula_on_a_loss_sequence(window):
  rng = np.random.default_rng(2)
  steps = 40
  decay = np.exp(-np.outer(np.arange(steps), [0.01, 0.05, 0.2]))
  losses_seq = decay * rng.uniform(0.5, 1.5, (steps, 3)) * np.array([1.0, 10.0, 0.1])
  losses_seq = losses_seq.astype(np.float32).astype(np.float64)
  tx = mtgrad.dwa(0.7, window=window, num_tasks=3)
  _, weights = _scan_weights(tx, losses_seq)
  expected = _dwa_oracle(losses_seq, 0.7, window)
  np.testing.assert_allclose(weights, expected, rtol=2e-5)
  np.testing.assert_array_equal(weights[: 2 * window], 1.0)
  assert np.ptp(weights[-1]) > 0.1  # the oracle is not trivially all ones


def test_dwa_default_window_and_bad_arguments():
  tx = mtgrad.dwa(num_tasks=2)
  losses_seq = np.stack([np.geomspace(1.0, 0.01, 300), np.ones(300)], axis=1)
  _, weights = _scan_weights(tx, losses_seq)
  np.testing.assert_array_equal(weights[:200], 1.0)
  np.testing.assert_allclose(weights[200:], _dwa_oracle(losses_seq, 2.0, 100)[200:], rtol=2e-5)
  assert float(weights[-1, 0]) < 1.0  # the falling loss gets less weight
  for bad in (0, -1, 2.5, "100"):
    with pytest.raises(ValueError, match="window"):
      mtgrad.dwa(window=bad, num_tasks=2)
  with pytest.raises(ValueError, match="temperature"):
    mtgrad.dwa(0.0, num_tasks=2)


def test_dwa_zero_and_nan_losses():
  tx = mtgrad.dwa(window=1, num_tasks=2)
  _, weights = _scan_weights(tx, np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 2.0]]))
  np.testing.assert_allclose(weights[2], 2 * np.exp([0.5, 1.0]) / np.exp([0.5, 1.0]).sum())
  _, weights = _scan_weights(tx, np.array([[1.0, 1.0], [np.nan, 1.0], [1.0, 1.0]]))
  assert np.isnan(weights[1]).all() and np.isnan(weights[2]).all()


# ------------------------------------------------- single backward path


def _model():
  x = jax.random.normal(jax.random.key(0), (16, 4))
  y = jnp.stack([jnp.sin(x[:, 0]), 10.0 * x[:, 1], 0.1 * x[:, 2] * x[:, 3]], axis=1)
  params = {"w": 0.3 * jax.random.normal(jax.random.key(1), (4, 3)), "b": jnp.zeros(3)}

  def losses_fn(p):
    h = jnp.tanh(x @ p["w"] + p["b"][None]) * jnp.array([[1.0, 10.0, 0.1]])
    return jnp.mean((h - y) ** 2, axis=0)  # [3]

  return params, losses_fn


@pytest.mark.parametrize(
  "make",
  [
    lambda: mtgrad.uncertainty(0.1, num_tasks=3),
    lambda: mtgrad.dwa(1.0, window=1, num_tasks=3),
    lambda: mtgrad.gls(num_tasks=3),
  ],
  ids=["uncertainty", "dwa", "gls"],
)
def test_single_backward_path_equals_stacked_gradients(make):
  tx = make()
  params, losses_fn = _model()

  @jax.jit
  def both(params, stacked_state, single_state):
    losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
    stacked, stacked_state = tx.update(grads, stacked_state, params, losses=losses)
    values, pullback = jax.vjp(losses_fn, params)
    weights, single_state = mtgrad.weights_from_losses(tx, single_state, values)
    (single,) = pullback(weights.astype(values.dtype))
    return stacked, single, stacked_state, single_state

  stacked_state = single_state = tx.init(params)
  seen = []
  for _ in range(6):
    stacked, single, stacked_state, single_state = both(params, stacked_state, single_state)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), single, stacked
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), single_state, stacked_state
    )
    seen.append(np.asarray(stacked_state.weights))
    params = jax.tree.map(lambda p, u: p - 0.05 * u, params, stacked)
  assert np.ptp(np.array(seen)[-1]) > 1e-3  # non-uniform weights were exercised


# --------------------------------------------------------------- GradNorm


def _gradnorm_oracle(matrices, losses_seq, selected_columns, alpha, lr):
  """The weights each step uses, from Algorithm 1 in float64 (Adam)."""
  t = matrices[0].shape[0]
  w, adam, initial, used = np.ones(t), _Adam(lr, t), None, []
  for g, losses in zip(matrices, losses_seq, strict=True):
    initial = losses if initial is None else initial
    norms = np.linalg.norm(g[:, selected_columns], axis=1)
    big_g = w * norms
    ratios = losses / initial
    targets = big_g.mean() * (ratios / ratios.mean()) ** alpha
    used.append(w.copy())
    w = np.maximum(w + adam.step(np.sign(big_g - targets) * norms), 1e-6)
    w = t * w / w.sum()
  return np.array(used)


@functools.cache
def _gradnorm_step(alpha, blocks_name):
  blocks = _BLOCKS[blocks_name]
  tx = mtgrad.gradnorm(alpha, 0.03, blocks=blocks, num_tasks=3)
  return tx, jax.jit(lambda g, s, p, losses: tx.update(g, s, p, losses=losses))


# Column order of harness.tree_from_matrix: leaves head, trunk/b, trunk/w.
_BLOCKS = {
  "all": None,
  "pytree": {"head": False, "trunk": {"b": True, "w": True}},
  "path": lambda path, leaf: "trunk" in jax.tree_util.keystr(path),
  "tree_callable": lambda params: {"head": False, "trunk": {"b": True, "w": True}},
}


@pytest.mark.parametrize("blocks_name", list(_BLOCKS))
def test_gradnorm_matches_algorithm_1(blocks_name):
  rng = np.random.default_rng(3)
  steps = 25
  scales = np.array([[1.0], [10.0], [0.1]])
  matrices = [rng.standard_normal((3, 11)) * scales for _ in range(steps)]
  losses_seq = rng.uniform(0.5, 2.0, (steps, 3)) * np.exp(
    -np.outer(np.arange(steps), [0, 0.1, 0.02])
  )
  matrices = [m.astype(np.float32).astype(np.float64) for m in matrices]
  losses_seq = losses_seq.astype(np.float32).astype(np.float64)
  columns = slice(None) if blocks_name == "all" else slice(3, 11)
  expected = _gradnorm_oracle(matrices, losses_seq, columns, 1.5, 0.03)
  tx, step = _gradnorm_step(1.5, blocks_name)
  _, params = _tree(matrices[0])
  state = tx.init(params)
  for k in range(steps):
    grads, _ = _tree(matrices[k])
    update, state = step(grads, state, params, jnp.asarray(losses_seq[k], jnp.float32))
    # float32 Adam on sign-alternating gradients (its momentum cancels) drifts
    # from the float64 oracle by <= 5.3e-6 over 25 steps (measured; the same
    # code under jax_enable_x64 matches it to 4e-16).
    np.testing.assert_allclose(state.weights, expected[k], rtol=0, atol=2e-5, err_msg=str(k))
    # The combine uses every leaf, W or not, with this step's (pre-update) weights.
    used = np.asarray(state.weights, np.float64)
    scale = np.abs(used) @ np.abs(matrices[k])
    np.testing.assert_allclose(
      harness.flatten_update(update), used @ matrices[k], atol=1e-6 * scale.max()
    )
    np.testing.assert_allclose(np.sum(state.weighting_state.next_weights.value), 3.0, rtol=1e-6)
  np.testing.assert_allclose(state.weighting_state.initial_losses, losses_seq[0], rtol=1e-7)
  assert np.ptp(expected[-1]) > 0.1


def test_gradnorm_closed_form_is_the_gradient_of_l_grad():
  # Plain SGD with step 1 exposes the raw gradient in w (before the clamp and
  # renormalisation, which leave sum-T positive weights unchanged here).
  norms = jnp.array([3.0, 0.5, 1.2])
  grads = {"w": jnp.diag(norms)}
  params = {"w": jnp.zeros(3)}
  initial, losses = jnp.array([2.0, 1.0, 4.0]), jnp.array([1.0, 0.9, 1.0])
  tx = mtgrad.gradnorm(0.7, optimizer=optax.sgd(0.01), num_tasks=3)
  _, state = tx.update(grads, tx.init(params), params, losses=initial)
  weights = state.weighting_state.next_weights.value
  _, state = tx.update(grads, state, params, losses=losses)

  def l_grad(w):
    big_g = w * norms
    ratios = losses / initial
    targets = jax.lax.stop_gradient(jnp.mean(big_g) * (ratios / jnp.mean(ratios)) ** 0.7)
    return jnp.sum(jnp.abs(big_g - targets))

  stepped = weights - 0.01 * jax.grad(l_grad)(weights)
  np.testing.assert_allclose(
    state.weighting_state.next_weights.value, 3 * stepped / stepped.sum(), rtol=1e-6
  )


def test_gradnorm_blocks_validation():
  params = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}
  assert selected_leaves(None, params) == (True, True)
  assert selected_leaves(lambda path, leaf: leaf.ndim == 2, params) == (False, True)
  assert selected_leaves({"a": True, "b": np.bool_(False)}, params) == (True, False)
  bad = [
    ({"a": False, "b": False}, "selects no parameter"),
    (lambda path, leaf: False, "selects no parameter"),
    ({"a": True}, "params structure"),
    ({"a": True, "b": "trunk"}, "True or False"),
    ("leaf", "pytree of bools"),
  ]
  for blocks, match in bad:
    tx = mtgrad.gradnorm(blocks=blocks, num_tasks=2)
    with pytest.raises(ValueError, match=match):
      tx.init(params)
  with pytest.raises(ValueError, match="num_tasks"):
    mtgrad.gradnorm()
  with pytest.raises(ValueError, match="alpha"):
    mtgrad.gradnorm(-1.0, num_tasks=2)


def test_gradnorm_has_no_single_backward_path():
  tx = mtgrad.gradnorm(num_tasks=2)
  with pytest.raises(ValueError, match="task gradients"):
    mtgrad.weights_from_losses(tx, tx.init({"w": jnp.zeros(2)}), jnp.ones(2))


def test_gradnorm_zero_gradients_zero_losses_and_nan():
  tx, step = _gradnorm_step(0.12, "all")
  zeros, params = _tree(np.zeros((3, 11)))
  state = tx.init(params)
  for losses in ([0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]):
    update, state = step(zeros, state, params, jnp.array(losses))
    np.testing.assert_array_equal(harness.flatten_update(update), 0.0)
    np.testing.assert_allclose(state.weighting_state.next_weights.value, 1.0)
  grads, _ = _tree(np.random.default_rng(4).standard_normal((3, 11)))
  update, state = step(grads, tx.init(params), params, jnp.array([0.0, 1.0, 2.0]))
  _, state = step(grads, state, params, jnp.array([0.0, 0.0, 0.0]))
  next_weights = state.weighting_state.next_weights.value
  assert np.all(np.isfinite(next_weights)) and np.all(next_weights > 0)
  np.testing.assert_allclose(np.sum(next_weights), 3.0, rtol=1e-6)
  update, state = step(grads, tx.init(params), params, jnp.array([1.0, np.nan, 1.0]))
  assert np.isnan(harness.flatten_update(update)).all()


def test_gradnorm_clamps_weights_positive():
  # Task 0's gradient dwarfs the others: its weight is pushed to the floor.
  tx = mtgrad.gradnorm(0.0, optimizer=optax.sgd(1.0), num_tasks=2)
  grads, params = {"w": jnp.array([[100.0, 0.0], [0.0, 1.0]])}, {"w": jnp.zeros(2)}
  _, state = tx.update(grads, tx.init(params), params, losses=jnp.ones(2))
  # 1 - 100 < 0 is clamped to 1e-6, then the weights are rescaled to sum 2.
  expected = 2 * np.array([1e-6, 2.0]) / (2.0 + 1e-6)
  np.testing.assert_allclose(state.weighting_state.next_weights.value, expected, rtol=1e-6)


def test_bfloat16_gradients_keep_float32_states():
  grads, params = _tree(np.random.default_rng(5).standard_normal((3, 11)))
  bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  for tx in (
    mtgrad.gradnorm(num_tasks=3),
    mtgrad.uncertainty(num_tasks=3),
    mtgrad.dwa(window=1, num_tasks=3),
    mtgrad.gls(num_tasks=3),
  ):
    state = tx.init(bf16(params))
    for _ in range(3):
      update, state = tx.update(bf16(grads), state, bf16(params), losses=jnp.ones(3, jnp.bfloat16))
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(update))
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (tx, leaf.dtype)
