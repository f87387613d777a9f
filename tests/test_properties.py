"""Every registry method against every property on the whole catalogue."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtgrad
from mtgrad._src import registry

from . import harness

METHODS = registry.names()
CASES = harness.catalogue()


def _declared(name: str, prop: str) -> bool:
  return prop in registry.info(name).properties


@pytest.mark.parametrize("prop", registry.PROPERTIES)
@pytest.mark.parametrize("name", METHODS)
def test_declared_property_holds_or_has_counterexample(name, prop):
  failures = {}
  for case in CASES:
    why = harness.violation(name, prop, case)
    if why is not None:
      failures[case.name] = why
  if _declared(name, prop):
    assert not failures, f"{name} declares {prop} but: {failures}"
  else:
    assert failures, (
      f"{name} does not declare {prop}, yet it holds on every catalogue case: "
      "declare it, or add a case that breaks it."
    )


@pytest.mark.parametrize("name", METHODS)
def test_output_has_params_structure_shapes_and_dtypes(name):
  for case in CASES[::3]:
    grads, params = harness.tree_from_matrix(case.matrix, case.shapes)
    _, init, step = harness.jitted(name, case.num_tasks)
    updates, _ = step(grads, init(params), params, jnp.asarray(case.losses, jnp.float32))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
      assert u.shape == p.shape and u.dtype == p.dtype


@pytest.mark.parametrize("name", METHODS)
def test_finite_inputs_give_finite_outputs(name):
  for case in CASES:
    out = harness.base_run(name, case)
    for update in out.updates:
      assert np.all(np.isfinite(update)), case.name


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_give_zero_update(name):
  out = harness.run(name, harness.zero_case())
  for update in out.updates:
    np.testing.assert_array_equal(update, 0.0)


@pytest.mark.parametrize("name", METHODS)
def test_nan_in_gives_nan_out(name):
  case = next(c for c in CASES if c.name == "nested/random_T3")
  matrix = case.matrix.copy()
  matrix[1, 4] = np.nan
  out = harness.run(name, case, matrix=matrix)
  assert np.isnan(out.updates[0]).any(), "a NaN gradient was silently hidden"
  if registry.info(name).needs_losses:
    losses = case.losses.copy()
    losses[0] = np.nan
    out = harness.run(name, case, losses=losses)
    assert np.isnan(out.updates[0]).any(), "a NaN loss was silently hidden"


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_gradients_keep_their_dtype(name):
  case = next(c for c in CASES if c.name == "nested/random_T3")
  grads, params = harness.tree_from_matrix(case.matrix, case.shapes)
  to_bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  _, init, step = harness.jitted(name, case.num_tasks)
  losses = jnp.asarray(case.losses, jnp.float32)
  updates, _ = step(to_bf16(grads), init(to_bf16(params)), to_bf16(params), losses)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  # Against float32 on the same (bfloat16-rounded) gradients.
  rounded = jax.tree.map(lambda g: g.astype(jnp.bfloat16).astype(jnp.float32), grads)
  full, _ = step(rounded, init(params), params, losses)
  for u, f in zip(jax.tree.leaves(updates), jax.tree.leaves(full), strict=True):
    np.testing.assert_allclose(
      np.asarray(u, np.float32), f, rtol=2e-2, atol=2e-2 * float(jnp.abs(f).max())
    )


# ------------------------------------------------------------- flags


@pytest.mark.parametrize("name", METHODS)
def test_needs_losses_flag(name):
  case = next(c for c in CASES if c.name == "flat/random_T3")
  grads, params = harness.tree_from_matrix(case.matrix, case.shapes)
  tx = registry.info(name).make(3)
  state = tx.init(params)
  if registry.info(name).needs_losses:
    with pytest.raises(ValueError, match="losses"):
      tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
      tx.update(grads, state, params, losses=jnp.ones(2))
    with pytest.raises(ValueError, match="floating"):
      tx.update(grads, state, params, losses=jnp.ones(3, jnp.int32))
  else:
    without, _ = tx.update(grads, state, params)
    with_losses, _ = tx.update(grads, state, params, losses=jnp.array([5.0, 1e-3, 9.0]))
    jax.tree.map(np.testing.assert_array_equal, without, with_losses)


@pytest.mark.parametrize("name", METHODS)
def test_stateful_flag(name):
  info = registry.info(name)
  kwargs = dict(info.example_kwargs(3))
  if info.stochastic:
    kwargs["key"] = 0
  if "num_tasks" not in inspect.signature(info.factory).parameters:
    assert not info.stateful
    return
  if info.stateful:
    with pytest.raises(ValueError, match="num_tasks"):
      info.factory(**kwargs)
    return
  # Without num_tasks the state has a T-free shape, so it is a scan carry.
  tx = info.factory(**kwargs)
  case = next(c for c in CASES if c.name == "flat/random_T3")
  grads, params = harness.tree_from_matrix(case.matrix, case.shapes)
  state = tx.init(params)
  assert getattr(state, "weights", None) is None

  def step(state, _):
    updates, state = tx.update(grads, state, params, losses=jnp.asarray(case.losses))
    return state, updates

  _, updates = jax.lax.scan(step, state, length=3)
  assert np.all(np.isfinite(harness.flatten_update(updates)))


@pytest.mark.parametrize("name", METHODS)
def test_stochastic_flag(name):
  info = registry.info(name)
  has_key = "key" in inspect.signature(info.factory).parameters
  assert has_key == info.stochastic
  case = next(c for c in CASES if c.name == "nested/random_T5")
  first = harness.run(name, case, key=0)
  again = harness.run(name, case, key=0)
  for a, b in zip(first.updates, again.updates, strict=True):
    np.testing.assert_array_equal(a, b)
  if info.stochastic:
    other = harness.run(name, case, key=1)
    assert not np.allclose(first.updates[0], other.updates[0]), "the key has no effect"


def test_registry_names_resolve():
  for name in METHODS:
    assert getattr(mtgrad, name) is registry.info(name).factory
    assert mtgrad.get(name, **_default_kwargs(name)) is not None
  with pytest.raises(ValueError, match="Did you mean"):
    mtgrad.get("meen")


def _default_kwargs(name):
  info = registry.info(name)
  kwargs = dict(info.example_kwargs(2))
  if info.stochastic:
    kwargs["key"] = 0
  if info.stateful:
    kwargs["num_tasks"] = 2
  return kwargs
