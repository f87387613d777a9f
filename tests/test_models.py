"""mtgrad.models: shapes, MMoE gates, NumPy oracles, per-task Jacobians."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtgrad
from mtgrad import models


def _dense(layer: nnx.Linear, x: np.ndarray) -> np.ndarray:
  return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def _mlp(mlp: models.MLP, x: np.ndarray) -> np.ndarray:
  for i, layer in enumerate(mlp.layers):
    x = _dense(layer, x)
    if mlp.activate_last or i < len(mlp.layers) - 1:
      x = np.maximum(x, 0.0)
  return x


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (6, 5))


def test_shared_bottom_shapes_and_numpy_oracle(x):
  model = models.SharedBottom(5, (7, 4), (3,), out_features=(1, 2, 3), rngs=nnx.Rngs(0))
  outputs = model(x)
  assert model.num_tasks == 3
  assert [y.shape for y in outputs] == [(6, 1), (6, 2), (6, 3)]
  h = _mlp(model.shared, np.asarray(x, np.float64))
  for y, tower in zip(outputs, model.towers, strict=True):
    np.testing.assert_allclose(y, _mlp(tower, h), rtol=1e-5, atol=1e-5)
  # any leading batch axes
  assert [y.shape for y in model(jnp.ones((2, 3, 5)))] == [(2, 3, 1), (2, 3, 2), (2, 3, 3)]


def test_mmoe_gates_are_softmax_weights_that_sum_to_one(x):
  model = models.MMoE(5, 4, (6,), (), out_features=(2, 2), rngs=nnx.Rngs(0))
  gates = np.asarray(model.gates(3.0 * x))
  assert gates.shape == (2, 6, 4)
  assert np.all(gates > 0)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  logits = [_dense(g, np.asarray(3.0 * x, np.float64)) for g in model.gate_layers]
  for t, z in enumerate(logits):
    expected = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(gates[t], expected / expected.sum(-1, keepdims=True), rtol=1e-5)


def test_mmoe_output_matches_numpy_mixture_of_experts(x):
  model = models.MMoE(5, 3, (6, 4), (5,), out_features=(1, 3), rngs=nnx.Rngs(2))
  xs = np.asarray(x, np.float64)
  experts = np.stack([_mlp(e, xs) for e in model.experts], axis=1)  # [N, E, H]
  gates = np.asarray(model.gates(x), np.float64)  # [T, N, E]
  for t, (y, tower) in enumerate(zip(model(x), model.towers, strict=True)):
    mixture = np.einsum("ne,neh->nh", gates[t], experts)
    np.testing.assert_allclose(y, _mlp(tower, mixture), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe"])
def test_per_task_jacobian_matches_per_task_grads(kind, x):
  rngs = nnx.Rngs(3)
  if kind == "shared_bottom":
    model = models.SharedBottom(5, (8,), (4,), out_features=(2, 1), rngs=rngs)
  else:
    model = models.MMoE(5, 3, (8,), (4,), out_features=(2, 1), rngs=rngs)
  graphdef, params = nnx.split(model, nnx.Param)
  targets = (jnp.ones((6, 2)), -jnp.ones((6, 1)))

  def task_losses(params, x):
    outputs = nnx.merge(graphdef, params)(x)
    return jnp.stack([jnp.mean((y - t) ** 2) for y, t in zip(outputs, targets, strict=True)])

  losses, jacobian = mtgrad.value_and_jacobian(task_losses)(params, x)
  np.testing.assert_allclose(losses, task_losses(params, x), rtol=1e-6)
  reverse = jax.jacrev(task_losses)(params, x)  # leading T axis as well
  for got, want in zip(jax.tree.leaves(jacobian), jax.tree.leaves(reverse), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for t in range(2):
    grad_t = jax.grad(lambda p, t=t: task_losses(p, x)[t])(params)
    for got, want in zip(jax.tree.leaves(jacobian), jax.tree.leaves(grad_t), strict=True):
      np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-7)
  # hard/soft sharing: a tower only receives its own task's gradient
  other_tower = jax.tree.leaves(jacobian["towers"][1])
  assert all(np.all(np.asarray(leaf[0]) == 0.0) for leaf in other_tower)
  assert any(np.any(np.asarray(leaf[1]) != 0.0) for leaf in other_tower)


def test_balanced_step_with_nnx_optimizer_lowers_both_losses(x):
  model = models.SharedBottom(5, (16,), (), out_features=(1, 1), rngs=nnx.Rngs(0))
  targets = (jnp.sum(x, -1, keepdims=True), 100.0 * x[:, :1])

  def task_losses(model):
    return jnp.stack([jnp.mean((y - t) ** 2) for y, t in zip(model(x), targets, strict=True)])

  optimizer = nnx.Optimizer(model, optax.chain(mtgrad.mgda(), optax.sgd(1e-3)), wrt=nnx.Param)
  before = task_losses(model)
  graphdef, params = nnx.split(model, nnx.Param)
  losses, task_grads = mtgrad.value_and_jacobian(lambda p: task_losses(nnx.merge(graphdef, p)))(
    params
  )
  optimizer.update(model, task_grads, losses=losses)
  after = task_losses(model)
  assert np.all(np.asarray(after) < np.asarray(before))  # MGDA: a common descent direction


def test_bad_configurations_are_value_errors():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="out_features"):
    models.SharedBottom(3, (4,), (), out_features=(), rngs=rngs)
  with pytest.raises(ValueError, match="shared_features"):
    models.SharedBottom(3, (), (), out_features=(1,), rngs=rngs)
  with pytest.raises(ValueError, match="num_experts"):
    models.MMoE(3, 0, (4,), (), out_features=(1,), rngs=rngs)
