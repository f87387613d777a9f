"""optax-style common tests, run over every registry method."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtgrad
from mtgrad._src import registry

METHODS = registry.names()


def _problem():
  """Two quadratic tasks with different minimisers on a nested pytree."""
  params = {"trunk": {"w": jnp.full((3,), 4.0), "b": jnp.array(-3.0)}, "head": [jnp.ones((2,))]}
  targets = (
    jnp.array([1.0, -1.0, 0.5, 0.0, 0.3, -0.2]),
    jnp.array([-1.0, 0.5, 1.0, 0.4, 0.0, 0.1]),
  )

  def losses_fn(p):
    flat = jnp.concatenate([p["trunk"]["w"], p["trunk"]["b"][None], p["head"][0]])
    return jnp.stack([0.5 * jnp.sum((flat - t) ** 2) + 0.1 for t in targets])

  return params, losses_fn


@pytest.mark.parametrize("name", METHODS)
def test_trains_two_task_problem_inside_scan(name):
  params, losses_fn = _problem()
  tx = optax.chain(registry.info(name).make(2), optax.adam(0.05))

  def step(carry, _):
    params, state = carry
    losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
    updates, state = tx.update(grads, state, params, losses=losses)
    return (optax.apply_updates(params, updates), state), losses

  (final, _), history = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=150))(params)
  start, end = float(history[0].sum()), float(losses_fn(final).sum())
  assert end < 0.3 * start, f"{name}: sum of losses {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("name", METHODS)
def test_unknown_extra_args_are_accepted(name):
  params, losses_fn = _problem()
  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  tx = optax.chain(registry.info(name).make(2), optax.scale(-0.1))
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, losses=losses, step=3, something_else="x")
  b, _ = tx.update(grads, state, params, losses=losses)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", METHODS)
def test_no_retrace_on_second_call(name):
  params, losses_fn = _problem()
  tx = registry.info(name).make(2)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
    return tx.update(grads, state, params, losses=losses)

  state = tx.init(params)
  _, state = step(params, state)
  _, state = step(params, state)
  assert len(traces) == 1


def _raw(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _numeric_hyperparams(info: registry.MethodInfo) -> dict:
  """The factory's float-valued arguments (defaults or example values)."""
  kwargs = dict(info.example_kwargs(2))
  for pname, param in inspect.signature(info.factory).parameters.items():
    if pname not in kwargs and param.default is not inspect.Parameter.empty:
      kwargs[pname] = param.default
  return {
    k: v
    for k, v in kwargs.items()
    if not isinstance(v, bool)
    and (isinstance(v, float) or (hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)))
  }


@pytest.mark.parametrize("name", METHODS)
def test_inject_hyperparams(name):
  info = registry.info(name)
  hyper = _numeric_hyperparams(info)
  others = {k: v for k, v in info.example_kwargs(2).items() if k not in hyper}
  if "num_tasks" in inspect.signature(info.factory).parameters:
    others["num_tasks"] = 2
  if info.stochastic:
    others["key"] = 0
  static = tuple(p for p in inspect.signature(info.factory).parameters if p not in hyper)
  tx = optax.inject_hyperparams(info.factory, static_args=static)(**others, **hyper)
  params, losses_fn = _problem()
  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  state = tx.init(params)
  assert set(state.hyperparams) == set(hyper)
  update = jax.jit(tx.update)
  reference, _ = update(grads, state, params, losses=losses)
  direct, _ = (
    registry.info(name)
    .make(2)
    .update(grads, registry.info(name).make(2).init(params), params, losses=losses)
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), reference, direct)
  for hp in hyper:
    changed = dict(state.hyperparams)
    changed[hp] = changed[hp] * 0.5 + 0.1
    moved, moved_state = update(grads, state._replace(hyperparams=changed), params, losses=losses)
    # The injected (traced) value must act exactly as the same value given to
    # the factory directly; the state counts too, since a hyperparameter may
    # act through it only (GradVac's EMA rate moves next step's targets).
    direct_tx = info.factory(**others, **{**hyper, hp: changed[hp]})
    expected, expected_state = direct_tx.update(
      grads, direct_tx.init(params), params, losses=losses
    )
    for a, b in zip(
      jax.tree.leaves((moved, moved_state.inner_state)),
      jax.tree.leaves((expected, expected_state)),
      strict=True,
    ):
      np.testing.assert_allclose(_raw(a), _raw(b), rtol=1e-5, atol=1e-7, err_msg=hp)


@pytest.mark.parametrize("name", METHODS)
def test_state_is_stable_through_cond(name):
  params, losses_fn = _problem()
  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  tx = registry.info(name).make(2)
  state = tx.init(params)

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(
      pred, lambda s: tx.update(grads, s, params, losses=losses)[1], lambda s: s, state
    )

  updated = maybe_update(True, state)
  kept = maybe_update(False, updated)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_raw(a), _raw(b)), updated, kept)
  leaves_before = jax.tree.leaves(state)
  for a, b in zip(leaves_before, jax.tree.leaves(updated), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("name", METHODS)
def test_jit_equals_eager(name):
  params, losses_fn = _problem()
  losses, grads = mtgrad.value_and_jacobian(losses_fn)(params)
  tx = registry.info(name).make(2)
  state = tx.init(params)
  eager_state = state
  jit_update = jax.jit(tx.update)
  for _ in range(2):
    eager, eager_state = tx.update(grads, eager_state, params, losses=losses)
    jitted, state = jit_update(grads, state, params, losses=losses)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)


@pytest.mark.parametrize("name", METHODS)
def test_vmap_over_independent_problems(name):
  params, losses_fn = _problem()
  tx = registry.info(name).make(2)
  shifts = jnp.array([0.0, 0.5, -2.0])
  batched_params = jax.tree.map(lambda p: p[None] + shifts.reshape((3,) + (1,) * p.ndim), params)
  losses, grads = jax.vmap(mtgrad.value_and_jacobian(losses_fn))(batched_params)
  states = jax.vmap(tx.init)(batched_params)
  updates, _ = jax.vmap(lambda g, s, p, loss: tx.update(g, s, p, losses=loss))(
    grads, states, batched_params, losses
  )
  for i in range(3):
    pick = lambda x, i=i: x[i]
    single, _ = tx.update(
      jax.tree.map(pick, grads),
      tx.init(jax.tree.map(pick, batched_params)),
      jax.tree.map(pick, batched_params),
      losses=losses[i],
    )
    jax.tree.map(
      lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), updates, single
    )


class _TwoHeads(nnx.Module):
  def __init__(self, rngs):
    self.trunk = nnx.Linear(3, 4, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(4, 1, rngs=rngs), nnx.Linear(4, 1, rngs=rngs)])

  def __call__(self, x):
    h = jnp.tanh(self.trunk(x))
    return [head(h)[:, 0] for head in self.heads]


@pytest.mark.parametrize("name", METHODS)
def test_flax_nnx_optimizer_round_trip(name):
  model = _TwoHeads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = (jnp.sin(x[:, 0]), 3.0 * x[:, 1])
  tx = optax.chain(registry.info(name).make(2), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def task_losses(params):
    out = nnx.merge(graphdef, params, rest)(x)
    return jnp.stack([jnp.mean((o - t) ** 2) for o, t in zip(out, y, strict=True)])

  losses, task_grads = mtgrad.value_and_jacobian(task_losses)(params)
  expected_updates, _ = tx.update(task_grads, tx.init(params), params, losses=losses)
  expected = optax.apply_updates(params, expected_updates)
  optimizer.update(model, task_grads, losses=losses)
  new_params = nnx.state(model, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_params, expected)
  assert float(task_losses(new_params).sum()) != float(losses.sum())
