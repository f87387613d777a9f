"""value_and_jacobian against jax.jacrev and per-task jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtgrad


def _losses(params, x, scale=1.0):
  h = jnp.tanh(x @ params["w"] + params["b"][None, :])
  return scale * jnp.stack([jnp.mean(h**2), jnp.mean(h), jnp.mean(jnp.sin(h))])


def _setup():
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.zeros(3)}
  x = jax.random.normal(jax.random.key(1), (5, 4))
  return params, x


def test_matches_jacrev_and_per_task_grad():
  params, x = _setup()
  losses, jac = mtgrad.value_and_jacobian(_losses)(params, x, scale=2.0)
  np.testing.assert_allclose(losses, _losses(params, x, 2.0), rtol=1e-6)
  expected = jax.jacrev(_losses)(params, x, 2.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jac, expected)
  for t in range(3):
    g = jax.grad(lambda p, t=t: _losses(p, x, 2.0)[t])(params)
    jax.tree.map(
      lambda a, b, t=t: np.testing.assert_allclose(a[t], b, rtol=1e-5, atol=1e-7), jac, g
    )


def test_has_aux_and_argnums_tuple():
  params, x = _setup()

  def with_aux(params, x):
    return _losses(params, x), {"n": x.shape[0]}

  (losses, aux), jac = mtgrad.value_and_jacobian(with_aux, has_aux=True)(params, x)
  assert aux == {"n": 5} and jac["w"].shape == (3, 4, 3)
  np.testing.assert_allclose(losses, _losses(params, x), rtol=1e-6)
  _, (jp, jx) = mtgrad.value_and_jacobian(_losses, argnums=(0, 1))(params, x)
  assert jp["b"].shape == (3, 3) and jx.shape == (3, 5, 4)


def test_per_task_batches_give_the_same_layout():
  params, x = _setup()
  batches = jnp.stack([x, 2 * x, -x])

  def single(params, xb):
    return jnp.mean(jnp.tanh(xb @ params["w"] + params["b"][None, :]) ** 2)

  losses, grads = jax.vmap(jax.value_and_grad(single), in_axes=(None, 0))(params, batches)
  assert losses.shape == (3,) and mtgrad.num_tasks(grads) == 3


def test_rejects_non_vector_losses():
  params, x = _setup()
  with pytest.raises(ValueError, match=r"\[T\] vector"):
    mtgrad.value_and_jacobian(lambda p, x: jnp.sum(_losses(p, x)))(params, x)
  with pytest.raises(ValueError, match="argnums"):
    mtgrad.value_and_jacobian(_losses, argnums=3)(params, x)
