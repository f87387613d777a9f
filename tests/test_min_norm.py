"""The exact min-norm solver and the methods on it: mgda, min_norm.

The oracles are float64 NumPy/SciPy code independent of the solver: an
enumeration of every support (the optimum is the best feasible solution of
the equality-constrained problem on some support) and SciPy's NNLS on
Lawson & Hanson's least-distance form. Accuracy is measured against what a
float32 Gram can resolve: rounding ``G`` moves the objective ``c^T G c`` by
up to ``eps * (sum_t |c_t| ||g_t||)^2``, so gaps are reported in units of
``eps32 * ((sum_t |c_t| ||g_t||)^2 + nu)``.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from mtgrad._src.methods.mgda import mgda
from mtgrad._src.methods.min_norm import min_norm
from mtgrad._src.solvers.info import default_max_iters
from mtgrad._src.solvers.min_norm import min_norm_weights

EPS32 = float(np.finfo(np.float32).eps)
BATCH = 64  # problems per solver call; with few task counts, few compilations
solve_one = jax.jit(min_norm_weights)  # eager dispatch is slower than compiling
solve_batch = jax.jit(jax.vmap(min_norm_weights))


# ----------------------------------------------------------------------------
# Oracles (float64, test only).


def oracle_enumerate(gram: np.ndarray, primary: np.ndarray) -> tuple[np.ndarray, float]:
  """Best feasible KKT point over all supports (cosine-scaled, float64)."""
  gram = np.asarray(gram, np.float64)
  primary = np.asarray(primary, bool)
  t = gram.shape[0]
  sq = np.clip(np.diag(gram), 0, None)
  if np.any(primary & (sq == 0)):  # a zero primary gradient is the optimum
    c = np.zeros(t)
    c[np.argmax(primary & (sq == 0))] = 1
    return c, 0.0
  norms = np.where(sq > 0, np.sqrt(sq), 1.0)
  cosine = gram / norms[:, None] / norms[None, :]
  a = np.where(primary, 1 / norms, 0.0)
  a = a / a.max()
  supports = np.array(list(itertools.product([False, True], repeat=t)))[1:]
  supports = supports[(supports & primary).any(1) & ~(supports & (sq == 0)).any(1)]
  k = len(supports)
  kkt = np.zeros((k, t + 1, t + 1))
  both = supports[:, :, None] & supports[:, None, :]
  kkt[:, :t, :t] = np.where(both, cosine, 0) + np.eye(t) * ~supports[:, :, None]
  kkt[:, :t, t] = kkt[:, t, :t] = np.where(supports, a, 0)
  rhs = np.zeros((k, t + 1))
  rhs[:, t] = 1
  u = np.einsum("kij,kj->ki", np.linalg.pinv(kkt, rcond=1e-13), rhs)[:, :t]
  u = np.where(supports, u, 0)
  feasible = (u >= -1e-9 * np.abs(u).max(1, keepdims=True)).all(1)
  c = np.clip(u[feasible], 0, None) / norms
  c = c / (c * primary).sum(1, keepdims=True)
  objective = np.einsum("ki,ij,kj->k", c, gram, c)
  best = np.argmin(objective)
  return c[best], float(objective[best])


def oracle_nnls(jac: np.ndarray, primary: np.ndarray) -> tuple[np.ndarray, float]:
  """SciPy NNLS on the least-distance form ``min ||[J^T; h^T] y - e||``."""
  jac = np.asarray(jac, np.float64)
  primary = np.asarray(primary, bool)
  sq = (jac**2).sum(1)
  if np.any(primary & (sq == 0)):
    c = np.zeros(len(sq))
    c[np.argmax(primary & (sq == 0))] = 1
    return c, 0.0
  weight = np.sqrt(sq[primary].min())
  e = np.vstack([jac.T, weight * primary[None, :]])
  f = np.zeros(e.shape[0])
  f[-1] = weight
  scale = np.linalg.norm(e, axis=0)
  scale = np.where(scale > 0, scale, 1)
  z, _ = scipy.optimize.nnls(e / scale, f, maxiter=50 * len(sq))
  c = z / scale
  c = c / (c * primary).sum()
  d = jac.T @ c
  return c, float(d @ d)


def objective(jac, weights):
  d = np.asarray(jac, np.float64).T @ np.asarray(weights, np.float64)
  return float(d @ d)


def gap_units(jac, weights, nu_oracle, eps=EPS32):
  """Objective gap in units of what a rounded Gram can resolve."""
  norms = np.linalg.norm(np.asarray(jac, np.float64), axis=1)
  floor = (np.abs(np.asarray(weights, np.float64)) * norms).sum() ** 2
  return (objective(jac, weights) - nu_oracle) / (eps * (floor + max(nu_oracle, 0)) + 1e-300)


# ----------------------------------------------------------------------------
# Instances.

KINDS = ("random", "rank_deficient", "duplicated", "zero_row", "opposite", "scales", "shared")


def make_instance(rng, t, kind):
  n = int(rng.integers(1, t + 2)) if kind == "rank_deficient" else int(rng.integers(t, 3 * t + 5))
  jac = rng.normal(size=(t, n))
  i, j = rng.choice(t, 2, replace=False)
  if kind == "duplicated":
    jac[j] = jac[i] * (1.0 if rng.random() < 0.5 else rng.uniform(0.1, 10))
  elif kind == "zero_row":
    jac[i] = 0
  elif kind == "opposite":
    jac[j] = -jac[i] * rng.uniform(0.1, 10)
  elif kind == "scales":
    jac *= 10.0 ** rng.uniform(-6, 6, size=(t, 1))
  elif kind == "shared":  # a common component: large min norm, dense weights
    jac += 3 * rng.normal(size=(1, n))
  draw = rng.random()
  if draw < 0.4:
    primary = np.ones(t, bool)
  elif draw < 0.7:
    primary = np.arange(t) == rng.integers(t)
  else:
    primary = rng.random(t) < 0.5
    primary[rng.integers(t)] = True
  return jac, primary


def solve(jacs, primaries, dtype=jnp.float32):
  """Solves a list of problems in one batch, padded to BATCH (one compile per T)."""
  grams = np.stack([j @ j.T for j in jacs])
  masks = np.stack(primaries)
  count = len(grams)
  assert count <= BATCH
  grams = np.concatenate([grams, np.repeat(grams[:1], BATCH - count, 0)])
  masks = np.concatenate([masks, np.repeat(masks[:1], BATCH - count, 0)])
  weights, info = solve_batch(jnp.asarray(grams, dtype), jnp.asarray(masks))
  info = jax.tree.map(lambda x: np.asarray(x)[:count], info)
  return np.asarray(weights, np.float64)[:count], info


# ----------------------------------------------------------------------------
# The solver against the oracles.


@pytest.mark.parametrize("t", [2, 4, 7, 12])
def test_solver_matches_oracle(t):
  # 63 problems per T: 7 kinds x 9 (random, rank-deficient, duplicated,
  # zero rows, opposite pairs, norms 1e-6..1e6, a shared component), each
  # with all tasks primary, one primary or a random split.
  rng = np.random.default_rng(t)
  cases = [(kind, *make_instance(rng, t, kind)) for kind in KINDS for _ in range(9)]
  weights, info = solve([c[1] for c in cases], [c[2] for c in cases])
  assert info.converged.all(), info.residual.max()
  assert (info.iterations <= default_max_iters(t)).all()
  for (kind, jac, primary), w in zip(cases, weights, strict=True):
    # Feasible: primary weights on the simplex, auxiliary weights >= 0.
    assert w.min() >= 0, kind
    np.testing.assert_allclose(w[primary].sum(), 1, rtol=1e-6)
    c_nnls, nu_nnls = oracle_nnls(jac, primary)
    if t <= 7:  # the two oracles agree (enumeration is 2^T solves)
      _, nu_enum = oracle_enumerate(jac @ jac.T, primary)
      assert abs(gap_units(jac, c_nnls, nu_enum, eps=1e-12)) < 1, kind
    # The float32 solver lands on the optimum, up to float32 resolution.
    gap = gap_units(jac, w, nu_nnls)
    assert -1 < gap < 2, (kind, primary, gap)


def test_solver_weights_match_oracle_when_unique():
  # Linearly independent, well-conditioned gradients: the weights are unique.
  rng = np.random.default_rng(0)
  for t in (4, 7):
    jacs = rng.normal(size=(BATCH, t, 3 * t)) * 10.0 ** rng.uniform(-3, 3, size=(BATCH, t, 1))
    primaries = [np.ones(t, bool) if k % 2 else np.arange(t) == k % t for k in range(BATCH)]
    weights, _ = solve(jacs, primaries)
    for jac, primary, w in zip(jacs, primaries, weights, strict=True):
      c, _ = oracle_enumerate(jac @ jac.T, primary)
      # Compared in the scale-free variables c_t ||g_t||.
      norms = np.linalg.norm(jac, axis=1)
      scale = np.abs(c * norms).max()
      np.testing.assert_allclose(w * norms / scale, c * norms / scale, atol=2e-4)


def test_solver_float64_is_exact_to_float64():
  rng = np.random.default_rng(1)
  cases = [make_instance(rng, 7, kind) for kind in KINDS for _ in range(9)]
  with jax.enable_x64(True):
    weights, info = solve([c[0] for c in cases], [c[1] for c in cases], dtype=jnp.float64)
  assert info.converged.all()
  for (jac, primary), w in zip(cases, weights, strict=True):
    _, nu = oracle_nnls(jac, primary)
    assert gap_units(jac, w, nu, eps=1e-12) < 1


def test_solver_extreme_scale_spread():
  # Gradient norms from 1e-10 to 1e10 in one problem (Gram entries 1e-20..1e20).
  rng = np.random.default_rng(2)
  jacs = rng.normal(size=(BATCH, 7, 20)) * 10.0 ** rng.uniform(-10, 10, size=(BATCH, 7, 1))
  primaries = [np.ones(7, bool) if k % 2 else np.arange(7) == 0 for k in range(BATCH)]
  weights, info = solve(jacs, primaries)
  assert info.converged.all()
  for jac, primary, w in zip(jacs, primaries, weights, strict=True):
    _, nu = oracle_enumerate(jac @ jac.T, primary)
    assert abs(objective(jac, w) - nu) <= 1e-5 * nu


def test_solver_forty_tasks_converges_within_budget():
  rng = np.random.default_rng(3)
  for n in (20, 60, 400):  # rank-deficient (0 often in the hull) and full rank
    jacs = rng.normal(size=(16, 40, n)) * 10.0 ** rng.uniform(-3, 3, size=(16, 40, 1))
    for primary in (np.ones(40, bool), np.arange(40) == 0, np.arange(40) < 20):
      weights, info = solve(jacs, [primary] * 16)
      assert (info.iterations < default_max_iters(40)).all()
      if n >= 40:
        assert info.converged.all()
      for jac, w in zip(jacs, weights, strict=True):
        _, nu = oracle_nnls(jac, primary)
        assert gap_units(jac, w, nu) < 20


def test_solver_timing_sanity():
  rng = np.random.default_rng(4)
  jacs = rng.normal(size=(BATCH, 40, 100))
  grams = jnp.asarray(np.einsum("kin,kjn->kij", jacs, jacs), jnp.float32)
  masks = jnp.ones((BATCH, 40), bool)
  jax.block_until_ready(solve_batch(grams, masks))  # compile
  start = time.perf_counter()
  jax.block_until_ready(solve_batch(grams, masks))
  assert time.perf_counter() - start < 5.0  # 64 problems with T = 40


def test_closed_form_one_primary_one_auxiliary():
  rng = np.random.default_rng(5)
  g = rng.normal(size=(BATCH, 2, 6)) * 10.0 ** rng.uniform(-4, 4, size=(BATCH, 2, 1))
  weights, info = solve(g, [np.array([True, False])] * BATCH)
  assert info.converged.all()
  inner = np.einsum("kn,kn->k", g[:, 0], g[:, 1])
  expected = np.maximum(-inner, 0) / np.einsum("kn,kn->k", g[:, 1], g[:, 1])
  assert (inner >= 0).sum() > 10 and (inner < 0).sum() > 10  # both cases
  np.testing.assert_allclose(weights[:, 0], 1, rtol=1e-6)
  np.testing.assert_allclose(weights[:, 1], expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_optimality_conditions(kind):
  # MGDA conditions <d, g_i> >= ||d||^2 (primary), <d, g_j> >= 0 (auxiliary),
  # with equality where the weight is positive.
  rng = np.random.default_rng(6)
  cases = [make_instance(rng, 7, kind) for _ in range(BATCH)]
  weights, _ = solve([c[0] for c in cases], [c[1] for c in cases])
  for (jac, primary), w in zip(cases, weights, strict=True):
    d = jac.T @ w
    inner = jac @ d
    # Float32 resolution: the Gram rounding moves <d, g_t> by eps ||g_t|| S,
    # and ||d||^2 by eps S^2, with S = sum_k |w_k| ||g_k|| >= ||d||.
    norms = np.linalg.norm(jac, axis=1)
    size = (np.abs(w) * norms).sum()
    tol = 50 * EPS32 * size * (norms + np.where(primary, size, 0))
    target = np.where(primary, d @ d, 0)
    assert (inner >= target - tol).all(), (inner - target) / (tol + 1e-300)
    assert (np.abs(inner - target)[w > 0] <= tol[w > 0]).all()


# ----------------------------------------------------------------------------
# Degenerate inputs.


def test_singular_and_zero_grams():
  all_primary = jnp.ones(3, bool)
  # [[0, 0], [0, 1]] (padded with a zero auxiliary row): the min norm is 0.
  weights, info = solve_one(jnp.diag(jnp.array([0.0, 1.0, 0.0])), jnp.array([True, True, False]))
  np.testing.assert_array_equal(weights, [1, 0, 0])
  assert info.converged
  weights, info = solve_one(jnp.zeros((3, 3)), all_primary)
  assert np.isfinite(weights).all() and weights.sum() == 1 and info.converged
  # Zero auxiliary gradient: weight 0. Zero primary gradient: it is the optimum.
  gram = jnp.diag(jnp.array([1.0, 0.0, 1.0]))
  weights, _ = solve_one(gram, jnp.array([True, False, False]))
  np.testing.assert_array_equal(weights, [1, 0, 0])
  weights, _ = solve_one(gram, jnp.array([False, True, False]))
  np.testing.assert_array_equal(weights, [0, 1, 0])
  # Identical gradients: finite, feasible.
  weights, info = solve_one(jnp.ones((3, 3)), all_primary)
  assert np.isfinite(weights).all() and np.isclose(weights.sum(), 1) and info.converged
  # No primary task at all: the cone's min-norm point is 0 (c = 0).
  weights, _ = solve_one(jnp.eye(3), jnp.zeros(3, bool))
  np.testing.assert_array_equal(weights, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gram_gives_nan_and_stops(bad):
  gram = jnp.eye(3).at[0, 1].set(bad).at[1, 0].set(bad)
  weights, info = solve_one(gram, jnp.ones(3, bool))
  assert np.isnan(weights).all()
  assert np.isnan(info.residual) and not info.converged and info.iterations == 0


def test_budget_exhaustion_is_reported():
  rng = np.random.default_rng(7)
  jac = rng.normal(size=(3, 30))
  _, info = solve_one(jnp.asarray(jac @ jac.T, jnp.float32), jnp.ones(3, bool), max_iters=2)
  assert info.iterations == 2 and not info.converged


# ----------------------------------------------------------------------------
# The transforms.


def tree_grads(rng, t, scales=None):
  grads = {"a": rng.normal(size=(t, 3, 2)), "b": rng.normal(size=(t, 4))}
  if scales is not None:
    grads = {k: v * scales.reshape((t,) + (1,) * (v.ndim - 1)) for k, v in grads.items()}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)


def flat(tree):
  """``[T, D]`` float64 rows of a task-gradient dict."""
  rows = [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in tree.values()]
  return np.concatenate(rows, 1)


def flat_update(updates):
  """``[D]`` float64 vector of an update dict (same leaf order as ``flat``)."""
  return flat({k: v[None] for k, v in updates.items()})[0]


def run(tx, grads, **kwargs):
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  return jax.jit(tx.update)(grads, tx.init(params), params, **kwargs)


def test_mgda_transform_is_min_norm_point():
  rng = np.random.default_rng(8)
  grads = tree_grads(rng, 4)
  updates, state = run(mgda(num_tasks=4), grads)
  jac = flat(grads)
  c, _ = oracle_enumerate(jac @ jac.T, np.ones(4, bool))
  np.testing.assert_allclose(flat_update(updates), jac.T @ c, atol=1e-5)
  np.testing.assert_allclose(state.weights, c, atol=1e-5)
  assert state.weighting_state.info.converged


def test_mgda_equals_min_norm_with_every_task_primary():
  rng = np.random.default_rng(9)
  grads = tree_grads(rng, 5)
  u1, s1 = run(mgda(), grads)
  u2, _ = run(min_norm(primary=range(5)), grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u1, u2)
  assert s1.weights is None and s1.weighting_state.info.converged


def test_mgda_task_order_invariance():
  rng = np.random.default_rng(10)
  grads = tree_grads(rng, 6, scales=10.0 ** rng.uniform(-3, 3, size=6))
  perm = rng.permutation(6)
  tx = mgda(num_tasks=6)
  u1, s1 = run(tx, grads)
  u2, s2 = run(tx, jax.tree.map(lambda g: g[perm], grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), u1, u2)
  np.testing.assert_allclose(s1.weights[perm], s2.weights, rtol=1e-4, atol=1e-9)


def test_min_norm_auxiliary_rescaling_and_non_conflict():
  # Rescaling an auxiliary gradient leaves the cone, hence d, unchanged.
  rng = np.random.default_rng(11)
  grads = tree_grads(rng, 4)
  scales = np.array([1.0, 1e-4, 1e3, 0.5], np.float32)
  tx = min_norm(primary=0, num_tasks=4)
  u1, s1 = run(tx, grads)
  u2, s2 = run(tx, tree_grads(np.random.default_rng(11), 4, scales))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), u1, u2)
  np.testing.assert_allclose(s1.weights, s2.weights * scales, rtol=1e-4, atol=1e-7)
  d = flat_update(u1)
  inner = flat(grads) @ d
  assert (inner[1:] >= -1e-5).all()
  np.testing.assert_allclose(inner[0], d @ d, rtol=1e-4)


def test_min_norm_closed_form_through_transform():
  grads = {"w": jnp.array([[1.0, 1.0], [-1.0, 0.0]])}
  updates, state = run(min_norm(primary=0, num_tasks=2), grads)
  np.testing.assert_allclose(updates["w"], [0, 1], atol=1e-6)
  np.testing.assert_allclose(state.weights, [1, 1], atol=1e-6)


@pytest.mark.parametrize(
  ("normalization", "combine_with"),
  [
    ("none", "normalized"),
    ("l2", "normalized"),
    ("loss", "normalized"),
    ("loss+", "normalized"),
    ("loss+", "original"),
  ],
)
def test_mgda_normalizations(normalization, combine_with):
  rng = np.random.default_rng(12)
  grads = tree_grads(rng, 4, scales=np.array([1.0, 10.0, 0.1, 3.0]))
  losses = jnp.array([0.5, 2.0, 1.0, 4.0], jnp.float32)
  jac = flat(grads)
  norms = np.linalg.norm(jac, axis=1)
  loss64 = np.asarray(losses, np.float64)
  normalizer = {"none": 1.0, "l2": norms, "loss": loss64, "loss+": loss64 * norms}[normalization]
  normalized = jac / np.broadcast_to(normalizer, (4,))[:, None]
  sol, _ = oracle_enumerate(normalized @ normalized.T, np.ones(4, bool))
  expected = normalized.T @ sol if combine_with == "normalized" else jac.T @ sol
  tx = mgda(normalization=normalization, combine_with=combine_with, num_tasks=4)
  updates, state = run(tx, grads, losses=losses)
  np.testing.assert_allclose(flat_update(updates), expected, rtol=1e-4, atol=1e-6)
  assert state.weighting_state.info.converged


def test_mgda_loss_normalizations_need_losses_and_valid_names():
  grads = tree_grads(np.random.default_rng(13), 3)
  for normalization in ("loss", "loss+"):
    with pytest.raises(ValueError, match="needs the per-task losses"):
      run(mgda(normalization=normalization), grads)
  with pytest.raises(ValueError, match="normalization"):
    mgda(normalization="L2")
  with pytest.raises(ValueError, match="combine_with"):
    mgda(normalization="l2", combine_with="raw")


def test_zero_and_nan_gradients_through_transforms():
  zeros = {"w": jnp.zeros((3, 4))}
  one_zero = {"w": jnp.zeros((3, 4)).at[1:, 0].set(1.0)}  # Gram [[0, 0, 0], [0, 1, 1], [0, 1, 1]]
  nan = {"w": jnp.ones((3, 4)).at[1, 2].set(jnp.nan)}
  for tx in (mgda(), mgda(normalization="l2"), min_norm(primary=[0, 2])):
    for grads in (zeros, one_zero):
      updates, state = run(tx, grads)
      np.testing.assert_array_equal(updates["w"], 0)
      assert state.weighting_state.info.converged
    updates, state = run(tx, nan)
    assert np.isnan(updates["w"]).all() and not state.weighting_state.info.converged


def test_min_norm_primary_validation():
  grads = {"w": jnp.eye(3)}
  with pytest.raises(ValueError, match="out of range for T=3"):
    run(min_norm(primary=3), grads)
  with pytest.raises(ValueError, match="out of range for T=3"):
    jax.jit(lambda g: run(min_norm(primary=[0, 5]), g))(grads)
  with pytest.raises(ValueError, match="out of range for T=2"):
    min_norm(primary=2, num_tasks=2)
  for bad in (-1, [], [0, -2], True, 1.5, "0", [0.0]):
    with pytest.raises(ValueError, match="primary"):
      min_norm(primary=bad)
  _, state = run(min_norm(primary=(2, 0, 2), num_tasks=3), grads)
  np.testing.assert_allclose(state.weights, [0.5, 0, 0.5], atol=1e-6)


def test_blockwise_jit_and_chain():
  rng = np.random.default_rng(14)
  grads = tree_grads(rng, 3)
  tx = mgda(num_tasks=3, blocks="leaf")
  updates, state = jax.jit(lambda g: run(tx, g))(grads)
  assert state.weights.shape == (2, 3)
  assert state.weighting_state.info.converged.shape == (2,)
  for i, key in enumerate(sorted(grads)):  # leaves in sorted-key order
    leaf = flat({key: grads[key]})
    c, _ = oracle_enumerate(leaf @ leaf.T, np.ones(3, bool))
    np.testing.assert_allclose(np.asarray(updates[key]).ravel(), leaf.T @ c, atol=1e-5)
    np.testing.assert_allclose(state.weights[i], c, atol=1e-5)
  chain = optax.chain(min_norm(primary=1), optax.sgd(0.1))
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  chain_updates, _ = jax.jit(chain.update)(grads, chain.init(params), params)
  assert jax.tree.structure(chain_updates) == jax.tree.structure(params)


def test_low_precision_gradients_keep_their_dtype():
  grads = {"w": jnp.asarray(np.random.default_rng(15).normal(size=(3, 8)), jnp.bfloat16)}
  updates, state = run(mgda(num_tasks=3), grads)
  assert updates["w"].dtype == jnp.bfloat16
  assert state.weights.dtype == jnp.float32 and state.weighting_state.info.converged
