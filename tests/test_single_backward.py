"""The single-backward path: loss-only methods without stacked task gradients.

For every registry method, `weights_from_losses` either refuses (its weights
depend on the gradients) or gives exactly the weights and state of `update`,
and one backward pass of the weighted loss then equals the stacked update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtgrad
from mtgrad._src import registry

METHODS = registry.names()


def _problem():
  params = {"w": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array(0.5)}
  x = jnp.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]])

  def losses_fn(p):
    z = x @ p["w"] + p["b"]
    return jnp.stack([(z[0] - 1.0) ** 2 + 0.1, jnp.exp(0.3 * z[1]), (z[2] + 2.0) ** 2 + 0.2])

  return params, losses_fn


def _single_backward_step(tx, losses_fn, params, state):
  losses, pullback = jax.vjp(losses_fn, params)
  weights, state = mtgrad.weights_from_losses(tx, state, losses)
  (grads,) = pullback(weights.astype(losses.dtype))
  return grads, state


@pytest.mark.parametrize("name", METHODS)
def test_single_backward_equals_stacked_update_or_refuses(name):
  params, losses_fn = _problem()
  tx = registry.info(name).make(3)
  state = tx.init(params)
  try:
    jax.eval_shape(lambda s: mtgrad.weights_from_losses(tx, s, losses_fn(params)), state)
  except ValueError as e:
    assert "single-backward" in str(e)
    return
  single_step = jax.jit(lambda p, s: _single_backward_step(tx, losses_fn, p, s))
  single_state = stacked_state = state
  for step in range(3):
    p = jax.tree.map(lambda v, s=step: v * (1.0 - 0.2 * s), params)
    single, single_state = single_step(p, single_state)
    losses, grads = mtgrad.value_and_jacobian(losses_fn)(p)
    stacked, stacked_state = tx.update(grads, stacked_state, p, losses=losses)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), single, stacked
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(_raw(a), _raw(b), rtol=2e-5, atol=1e-7),
      single_state,
      stacked_state,
    )


def _raw(x):
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def test_loss_only_methods_of_the_registry_have_the_single_backward_path():
  # The gradient-free weightings must not silently lose the cheap path.
  params, losses_fn = _problem()
  losses = losses_fn(params)
  expected = {"sum", "mean", "constant", "rlw", "inverse_loss", "initial_loss", "uncertainty"}
  expected |= {"dwa", "gls", "imtl_l", "stch", "famo"}
  for name in expected:
    tx = registry.info(name).make(3)
    weights, _ = mtgrad.weights_from_losses(tx, tx.init(params), losses)
    assert weights.shape == (3,)


def test_gradient_methods_refuse_with_a_clear_error():
  params, losses_fn = _problem()
  for tx in (mtgrad.mgda(), mtgrad.inverse_norm(blocks=None), mtgrad.graddrop(key=0)):
    with pytest.raises(ValueError, match="single-backward path"):
      mtgrad.weights_from_losses(tx, tx.init(params), losses_fn(params))
  with pytest.raises(ValueError, match=r"losses must be \[T\]"):
    tx = mtgrad.sum()
    mtgrad.weights_from_losses(tx, tx.init(params), jnp.ones((3, 1)))


def test_wrong_number_of_losses_is_a_clear_error():
  params, losses_fn = _problem()
  tx = mtgrad.inverse_loss(num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks=2"):
    mtgrad.weights_from_losses(tx, tx.init(params), losses_fn(params))
