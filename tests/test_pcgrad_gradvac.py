"""PCGrad and GradVac against closed forms and float64 NumPy oracles.

The oracles run the papers' sequential algorithms on the actual gradient
vectors (not on the Gram matrix), replaying the visiting orders the
transforms derive from their keys.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtgrad._src import tree
from mtgrad._src.methods import _coefficients
from mtgrad._src.methods.gradvac import gradvac
from mtgrad._src.methods.gradvac import gradvac_weights
from mtgrad._src.methods.pcgrad import pcgrad
from mtgrad._src.methods.pcgrad import pcgrad_weights
from mtgrad._src.solvers.cosine import norms_and_cosines

from . import harness

SHAPES = {"a": (3, 4), "b": (5,)}  # 17 numbers per task
_flat = harness.flatten_tasks
_flat_update = harness.flatten_update


def _grads(vectors):
  """Splits ``[T, 17]`` rows into the test pytree (float32)."""
  return harness.tree_from_matrix(np.asarray(vectors), SHAPES)[0]


def _params():
  return harness.tree_from_matrix(np.zeros((1, 17)), SHAPES)[1]


def _step_orders(state, num_tasks):
  """The visiting orders the next update will use (the builder's key schedule)."""
  step_key = jax.random.split(state.key)[1]
  return np.asarray(_coefficients.task_orders(step_key, num_tasks))


def _sequential(vectors, orders, step):
  """Runs ``ĝ_i += step(i, j, ĝ_i, g_j) g_j`` over ``j`` in ``orders[i]`` on the
  actual vectors (float64), for every task ``i``.

  Returns the update ``sum_i ĝ_i`` and the coefficients ``C`` (``ĝ_i =
  sum_k C_ik g_k``); a zero gradient's column is 0 (it contributes nothing,
  and the transforms report weight 0 for it).
  """
  g = np.asarray(vectors, np.float64)
  coef = np.eye(g.shape[0])
  update = np.zeros(g.shape[1])
  for i, order in enumerate(orders):
    v = g[i].copy()
    for j in order:
      x = step(i, j, v, g[j])
      v += x * g[j]
      coef[i, j] += x
    update += v
  return update, np.where(np.linalg.norm(g, axis=1)[None, :] > 0, coef, 0)


def _oracle_pcgrad(vectors, orders):
  """Algorithm 1 of Yu et al. 2020: project off every conflicting g_j."""

  def step(i, j, v, g_j):
    sq, dot = g_j @ g_j, v @ g_j
    return -dot / sq if sq > 0 and dot < 0 else 0.0

  return _sequential(vectors, orders, step)


def _oracle_gradvac(vectors, phi, orders, beta):
  """Algorithm 1 of Wang et al. 2021; also returns the new targets."""
  phi = np.array(phi, np.float64)

  def step(i, j, v, g_j):
    norm_i, norm_j = np.linalg.norm(v), np.linalg.norm(g_j)
    if norm_i == 0 or norm_j == 0:
      return 0.0
    cos = np.clip(v @ g_j / (norm_i * norm_j), -1, 1)
    target = phi[i, j]
    phi[i, j] = (1 - beta) * target + beta * cos
    if not cos < target < 1:
      return 0.0
    return (
      norm_i
      * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2))
      / (norm_j * np.sqrt(1 - target**2))
    )

  return (*_sequential(vectors, orders, step), phi)


def _assert_matches(updates, weights, vectors, update_ref, coef, rtol=2e-5):
  """Update and weights agree with the oracle to float32 accuracy.

  Tolerances scale with the size of the terms summed (``|C_ik| ||g_k||``),
  which is what float32 rounding is relative to.
  """
  norms = np.linalg.norm(np.asarray(vectors, np.float64), axis=1)
  term_sizes = np.abs(coef) * norms[None, :]
  err = np.linalg.norm(_flat_update(updates) - update_ref)
  assert err <= rtol * term_sizes.sum() + 1e-30, (err, term_sizes.sum())
  if weights is not None:
    werr = np.abs(np.asarray(weights, np.float64) - coef.sum(0))
    bound = rtol * np.abs(coef).sum(0) + 1e-30
    assert np.all(werr <= bound), (werr, bound)


def _conflicting(rng, num_tasks):
  """Random task gradients with a shared component of random sign and size."""
  common = rng.normal(size=17)
  mix = rng.uniform(-1.5, 1.5, size=(num_tasks, 1))
  vectors = mix * common[None, :] + rng.normal(size=(num_tasks, 17))
  return vectors.astype(np.float32)


@functools.cache
def _jitted(method, num_tasks, key=0, **kwargs):
  """``(init, jitted update)`` of ``method``, compiled once per configuration."""
  factory = {"pcgrad": pcgrad, "gradvac": gradvac}[method]
  tx = factory(key=key, num_tasks=num_tasks, **kwargs)
  return tx.init, jax.jit(tx.update)


_gram = jax.jit(tree.gram)
_combine = jax.jit(tree.combine)
_gradvac_weights = jax.jit(gradvac_weights)
_pcgrad_weights = jax.jit(pcgrad_weights, static_argnames="reduction")


@jax.jit
def _pcgrad_coefficients(gram, orders):
  """PCGrad's scale-free coefficients ``a`` (``ĝ_i = n_i sum_k a_ik u_k``)."""
  visit = lambda j, a, q, carry: (jnp.where(q[j] < 0, -q[j], 0), carry)
  return _coefficients.sweep(visit, norms_and_cosines(gram)[1], orders)[0]


# --- PCGrad -----------------------------------------------------------------


def test_pcgrad_two_tasks_closed_form_symmetric_and_key_free():
  g1 = np.array([3.0, 1.0, -2.0] + [0.5] * 14)
  g2 = np.array([-2.0, 1.0, 1.0] + [-0.25] * 14)
  dot = g1 @ g2
  assert dot < 0
  expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
  for rows in ([g1, g2], [g2, g1]):
    grads = _grads(np.stack(rows))
    gram = _gram(grads)
    weights = [_pcgrad_weights(gram, jax.random.key(k)) for k in range(4)]
    for w in weights[1:]:
      np.testing.assert_array_equal(w, weights[0])  # no randomness with two tasks
    np.testing.assert_allclose(
      _flat_update(_combine(grads, weights[0])), expected, rtol=1e-5, atol=1e-6
    )


def test_pcgrad_without_conflict_is_the_plain_sum():
  vectors = np.abs(np.random.default_rng(0).normal(size=(5, 17))).astype(np.float32)
  weights = _pcgrad_weights(_gram(_grads(vectors)), jax.random.key(1))
  np.testing.assert_array_equal(weights, np.ones(5, np.float32))  # all inner products > 0


def test_task_orders_are_per_task_permutations_of_the_others():
  orders = np.asarray(_coefficients.task_orders(jax.random.key(3), 7))
  assert orders.shape == (7, 6)
  for i, row in enumerate(orders):
    assert sorted(row) == [j for j in range(7) if j != i]
  assert len({tuple(np.argsort(row)) for row in orders}) > 1  # not one shared order


@pytest.mark.parametrize("num_tasks", [4, 7])
def test_pcgrad_matches_sequential_oracle_over_steps(num_tasks):
  rng = np.random.default_rng(num_tasks)
  init, update = _jitted("pcgrad", num_tasks)
  state = init(_params())
  for _ in range(3):
    vectors = _conflicting(rng, num_tasks)
    orders = _step_orders(state, num_tasks)
    update_ref, coef = _oracle_pcgrad(vectors, orders)
    assert np.any(coef != np.eye(num_tasks))  # some projection happened
    updates, state = update(_grads(vectors), state, _params())
    _assert_matches(updates, state.weights, vectors, update_ref, coef)


def test_pcgrad_mean_is_sum_over_t_and_arguments_are_checked():
  gram = _gram(_grads(_conflicting(np.random.default_rng(1), 4)))
  key = jax.random.key(5)
  np.testing.assert_allclose(
    _pcgrad_weights(gram, key, reduction="mean"), _pcgrad_weights(gram, key) / 4, rtol=1e-6
  )
  with pytest.raises(ValueError, match="reduction"):
    pcgrad(key=0, reduction="max")
  with pytest.raises(ValueError, match="key"):
    pcgrad(key=None)


def test_single_task_is_identity():
  vectors = np.random.default_rng(2).normal(size=(1, 17)).astype(np.float32)
  for tx in (pcgrad(key=0, num_tasks=1), gradvac(key=0, num_tasks=1)):
    updates, state = tx.update(_grads(vectors), tx.init(_params()))
    np.testing.assert_array_equal(state.weights, [1.0])
    np.testing.assert_allclose(_flat_update(updates), vectors[0], rtol=1e-6)


# --- GradVac ----------------------------------------------------------------


def test_gradvac_matches_sequential_oracle_over_steps_with_traced_beta():
  # One jitted transform for every beta: beta is a traced hyperparameter.
  num_tasks = 4
  injected = optax.inject_hyperparams(gradvac, static_args=("key", "num_tasks"))(
    beta=0.5, key=0, num_tasks=num_tasks
  )
  init, update = injected.init, jax.jit(injected.update)
  for beta in (0.0, 1.0, 0.5):
    rng = np.random.default_rng(11)
    state = init(_params())
    state.hyperparams["beta"] = jnp.asarray(beta)
    phi = np.zeros((num_tasks, num_tasks))
    positive_targets = False
    for _ in range(5):
      vectors = _conflicting(rng, num_tasks)
      orders = _step_orders(state.inner_state, num_tasks)
      positive_targets |= bool(np.any(phi > 0))
      update_ref, coef, phi = _oracle_gradvac(vectors, phi, orders, beta)
      updates, state = update(_grads(vectors), state, _params())
      inner = state.inner_state
      _assert_matches(updates, inner.weights, vectors, update_ref, coef, rtol=5e-5)
      np.testing.assert_allclose(inner.weighting_state.phi, phi, atol=2e-6)
    if beta == 0:
      np.testing.assert_array_equal(inner.weighting_state.phi, 0)
    else:
      assert positive_targets  # corrections towards positive targets were exercised
  # The plain factory (beta a Python float) gives the same steps.
  plain_init, plain_update = _jitted("gradvac", num_tasks, beta=0.5)
  rng = np.random.default_rng(11)
  plain_state = plain_init(_params())
  for _ in range(5):
    plain_updates, plain_state = plain_update(_grads(_conflicting(rng, num_tasks)), plain_state)
  np.testing.assert_allclose(_flat_update(plain_updates), _flat_update(updates), rtol=1e-6)


def test_gradvac_beta_zero_is_pcgrad_and_beta_one_tracks_last_cosine():
  rng = np.random.default_rng(4)
  vac_init, vac_update = _jitted("gradvac", 4, beta=0.0)
  pc_init, pc_update = _jitted("pcgrad", 4)
  vac_state, pc_state = vac_init(_params()), pc_init(_params())
  for _ in range(3):
    grads = _grads(_conflicting(rng, 4))
    _, vac_state = vac_update(grads, vac_state)
    _, pc_state = pc_update(grads, pc_state)
    np.testing.assert_allclose(vac_state.weights, pc_state.weights, rtol=1e-5, atol=1e-6)
  # beta = 1, two tasks: the targets are the cosines of the last step.
  vectors = _conflicting(rng, 2)
  g = vectors.astype(np.float64)
  cos = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
  _, phi = _gradvac_weights(g @ g.T, jnp.zeros((2, 2)), jax.random.key(0), 1.0)
  np.testing.assert_allclose(phi, [[0, cos], [cos, 0]], atol=1e-6)


def test_gradvac_correction_reaches_the_target():
  # Task 0 is below a target of 0.8 with task 1: after the correction its
  # cosine is the target. Task 1 (target 0, cosine > 0) is unchanged.
  g = np.array([[1.0, 0.0] + [0.0] * 15, [0.2, 1.0] + [0.0] * 15])
  phi = jnp.array([[0.0, 0.8], [0.0, 0.0]])
  weights, _ = _gradvac_weights(jnp.asarray(g @ g.T, jnp.float32), phi, jax.random.key(0), 0.5)
  corrected = g[0] + (float(weights[1]) - 1) * g[1]
  cos = corrected @ g[1] / np.linalg.norm(corrected) / np.linalg.norm(g[1])
  np.testing.assert_allclose(cos, 0.8, atol=1e-6)
  np.testing.assert_allclose(weights[0], 1.0, rtol=1e-6)


def test_gradvac_blockwise_equals_per_leaf_gradvac():
  rng = np.random.default_rng(5)
  params = _params()
  leaves = sorted(SHAPES)  # jax.tree.leaves order: "a", "b"
  # Two tasks (no randomness): block-wise vs one whole-model transform per leaf.
  init, update = _jitted("gradvac", 2, beta=0.5, blocks="leaf")
  leaf_init, leaf_update = _jitted("gradvac", 2, beta=0.5)
  state = init(params)
  assert state.weighting_state.phi.shape == (2, 2, 2)
  leaf_states = {name: leaf_init(params[name]) for name in leaves}
  for _ in range(4):
    grads = _grads(_conflicting(rng, 2))
    updates, state = update(grads, state, params)
    for b, name in enumerate(leaves):
      leaf_updates, leaf_states[name] = leaf_update(grads[name], leaf_states[name])
      np.testing.assert_allclose(updates[name], leaf_updates, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(
        state.weighting_state.phi[b], leaf_states[name].weighting_state.phi, atol=1e-6
      )
  # Four tasks: each block is the whole-model weighting on its leaf, with its block key.
  init, update = _jitted("gradvac", 4, beta=0.5, blocks="leaf")
  state = init(params)
  phis = [jnp.zeros((4, 4)), jnp.zeros((4, 4))]
  for _ in range(3):
    grads = _grads(_conflicting(rng, 4))
    block_keys = jax.random.split(jax.random.split(state.key)[1], 2)
    updates, state = update(grads, state, params)
    for b, name in enumerate(leaves):
      weights, phis[b] = _gradvac_weights(_gram(grads[name]), phis[b], block_keys[b], 0.5)
      np.testing.assert_allclose(state.weights[b], weights, rtol=1e-6)
      np.testing.assert_allclose(
        updates[name], _combine(grads[name], weights), rtol=1e-6, atol=1e-6
      )
      np.testing.assert_allclose(state.weighting_state.phi[b], phis[b], atol=1e-7)


def test_gradvac_validates_arguments():
  with pytest.raises(ValueError, match="num_tasks"):
    gradvac(key=0)
  with pytest.raises(ValueError, match="key"):
    gradvac(num_tasks=2)
  with pytest.raises(ValueError, match="beta"):
    gradvac(beta=1.5, key=0, num_tasks=2)


# --- Edge cases shared by both ------------------------------------------------


def _both(num_tasks):
  """Jitted PCGrad and GradVac with the same key (so the same orders)."""
  return _jitted("pcgrad", num_tasks), _jitted("gradvac", num_tasks, beta=0.5)


def test_zero_gradients_give_finite_results():
  vectors = _conflicting(np.random.default_rng(14), 4)
  vectors[1] = 0
  (pc_init, pc_update), (vac_init, vac_update) = _both(4)
  pc_state, vac_state = pc_init(_params()), vac_init(_params())
  phi = np.zeros((4, 4))
  for _ in range(2):
    orders = _step_orders(pc_state, 4)
    update_ref, coef = _oracle_pcgrad(vectors, orders)
    assert np.any(coef[[0, 2, 3]] != np.eye(4)[[0, 2, 3]])  # the others do conflict
    updates, pc_state = pc_update(_grads(vectors), pc_state)
    _assert_matches(updates, pc_state.weights, vectors, update_ref, coef)
    update_ref, coef, phi = _oracle_gradvac(vectors, phi, orders, 0.5)
    vac_updates, vac_state = vac_update(_grads(vectors), vac_state)
    _assert_matches(vac_updates, vac_state.weights, vectors, update_ref, coef, rtol=5e-5)
    for u, state in ((updates, pc_state), (vac_updates, vac_state)):
      assert np.all(np.isfinite(_flat_update(u)))
      assert state.weights[1] == 0
  # Pairs with the zero gradient have no cosine: their targets never move.
  np.testing.assert_array_equal(vac_state.weighting_state.phi[1], 0)
  np.testing.assert_array_equal(vac_state.weighting_state.phi[:, 1], 0)
  for init, update in ((pc_init, pc_update), (vac_init, vac_update)):
    updates, state = update(_grads(np.zeros((4, 17))), init(_params()))
    np.testing.assert_array_equal(_flat_update(updates), 0)
    np.testing.assert_array_equal(state.weights, 0)
    # NaN in, NaN out, in every output.
    vectors_nan = _conflicting(np.random.default_rng(9), 4)
    vectors_nan[0, 4] = np.nan
    updates, state = update(_grads(vectors_nan), init(_params()))
    assert np.all(np.isnan(_flat_update(updates)))
    assert np.all(np.isnan(state.weights))


def test_mixed_scales_1e_minus_8_to_1e8():
  num_tasks = 4
  scales = np.array([1.0, 1e-8, 1e8, 1e-4])
  rng = np.random.default_rng(10)
  (pc_init, pc_update), (vac_init, vac_update) = _both(num_tasks)
  base_vectors = _conflicting(rng, num_tasks)
  vectors = (base_vectors.astype(np.float64) * scales[:, None]).astype(np.float32)
  state = pc_init(_params())
  orders = _step_orders(state, num_tasks)
  updates, state = pc_update(_grads(vectors), state)
  update_ref, coef = _oracle_pcgrad(vectors, orders)
  _assert_matches(updates, state.weights, vectors, update_ref, coef)
  # Every task's own coefficients, even at 1e-8 next to 1e8: the sweep runs in
  # scale-free variables (a_ik = C_ik n_k / n_i), so nothing is lost.
  a = _pcgrad_coefficients(_gram(_grads(vectors)), jnp.asarray(orders))
  n = np.linalg.norm(vectors.astype(np.float64), axis=1)
  np.testing.assert_allclose(a, coef * n[None, :] / n[:, None], rtol=1e-4, atol=1e-6)
  # Homogeneity: the same weights for c J, at both ends of the range.
  for init, update in ((pc_init, pc_update), (vac_init, vac_update)):
    _, ref_state = update(_grads(base_vectors), init(_params()))
    for c in (1e-8, 1e8):
      _, scaled_state = update(_grads(base_vectors * np.float32(c)), init(_params()))
      np.testing.assert_allclose(scaled_state.weights, ref_state.weights, rtol=1e-5)
  # GradVac at mixed scales, several steps.
  state = vac_init(_params())
  phi = np.zeros((num_tasks, num_tasks))
  for _ in range(3):
    vectors = _conflicting(rng, num_tasks).astype(np.float64) * scales[:, None]
    vectors = vectors.astype(np.float32)
    orders = _step_orders(state, num_tasks)
    update_ref, coef, phi = _oracle_gradvac(vectors, phi, orders, 0.5)
    updates, state = vac_update(_grads(vectors), state)
    _assert_matches(updates, state.weights, vectors, update_ref, coef, rtol=5e-5)
    np.testing.assert_allclose(state.weighting_state.phi, phi, atol=2e-6)


def test_blockwise_pcgrad_under_jit():
  rng = np.random.default_rng(12)
  init, update = _jitted("pcgrad", 4, blocks="leaf")
  state = init(_params())
  grads = _grads(_conflicting(rng, 4))
  block_keys = jax.random.split(jax.random.split(state.key)[1], 2)
  updates, state = update(grads, state, _params())
  assert state.weights.shape == (2, 4)
  for b, name in enumerate(sorted(SHAPES)):
    vectors = _flat({name: grads[name]})
    orders = np.asarray(_coefficients.task_orders(block_keys[b], 4))
    update_ref, coef = _oracle_pcgrad(vectors, orders)
    _assert_matches({name: updates[name]}, state.weights[b], vectors, update_ref, coef)
