"""Defining identities of the baseline and loss-normalising methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import mtgrad


def _grads(t=3, d=5, seed=0):
  return {"w": jax.random.normal(jax.random.key(seed), (t, d))}, {"w": jnp.zeros(d)}


def test_rlw_weights_are_softmax_of_fresh_normals_each_step():
  grads, params = _grads()
  tx = mtgrad.rlw(jax.random.key(42), num_tasks=3)
  state = tx.init(params)
  seen = []
  for _ in range(200):
    _, state = tx.update(grads, state, params)
    seen.append(np.asarray(state.weights))
  seen = np.array(seen)
  np.testing.assert_allclose(seen.sum(1), 1.0, rtol=1e-6)
  assert len({tuple(r) for r in seen}) == 200
  logits = np.log(seen) - np.log(seen).mean(1, keepdims=True)
  # softmax(z) with z ~ N(0, I): centred log-weights have variance (T-1)/T per task.
  np.testing.assert_allclose(logits.var(0), (3 - 1) / 3, rtol=0.25)


def test_inverse_norm_sums_unit_gradients_and_ignores_zero_rows():
  grads = {
    "a": jnp.array([[3.0, 0.0], [0.0, 0.0], [0.0, 2.0]]),
    "b": jnp.array([[4.0], [0.0], [0.0]]),
  }
  tx = mtgrad.inverse_norm()
  out, _ = tx.update(grads, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)}))
  np.testing.assert_allclose(out["a"], [0.6, 1.0])
  np.testing.assert_allclose(out["b"], [0.8])


def test_inverse_loss_is_the_gradient_of_the_sum_of_log_losses():
  params = {"w": jnp.array([0.3, -1.2, 2.0])}
  targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])

  def losses_fn(p):
    return jnp.sum((p["w"][None, :] - targets) ** 2, axis=1) + 0.5

  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  tx = mtgrad.inverse_loss()
  out, _ = tx.update(grads, tx.init(params), losses=losses)
  expected = jax.grad(lambda p: jnp.sum(jnp.log(losses_fn(p))))(params)
  np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-6)


def test_initial_loss_keeps_the_first_losses():
  grads, params = _grads(t=2)
  tx = mtgrad.initial_loss(num_tasks=2)
  state = tx.init(params)
  for losses in ([2.0, 8.0], [1.0, 1.0], [0.1, 50.0]):
    out, state = tx.update(grads, state, losses=jnp.array(losses))
    np.testing.assert_allclose(state.weights, [0.5, 0.125])
  np.testing.assert_allclose(state.weighting_state.initial_losses, [2.0, 8.0])
  np.testing.assert_allclose(out["w"], 0.5 * grads["w"][0] + 0.125 * grads["w"][1], rtol=1e-6)


def test_zero_losses_give_finite_weights():
  grads, params = _grads(t=2)
  for tx in (mtgrad.inverse_loss(num_tasks=2), mtgrad.initial_loss(num_tasks=2)):
    out, state = tx.update(grads, tx.init(params), losses=jnp.array([0.0, 2.0]))
    np.testing.assert_array_equal(state.weights, [0.0, 0.5])
    assert np.all(np.isfinite(out["w"]))


def test_sum_mean_constant():
  grads, params = _grads()
  s, _ = mtgrad.sum().update(grads, mtgrad.sum().init(params))
  m, _ = mtgrad.mean().update(grads, mtgrad.mean().init(params))
  c, _ = mtgrad.constant([1.0, 0.0, 2.0]).update(
    grads, mtgrad.constant([1.0, 0.0, 2.0]).init(params)
  )
  g = np.asarray(grads["w"], np.float64)
  np.testing.assert_allclose(s["w"], g.sum(0), rtol=1e-6)
  np.testing.assert_allclose(m["w"], g.mean(0), rtol=1e-6)
  np.testing.assert_allclose(c["w"], g[0] + 2 * g[2], rtol=1e-6)
