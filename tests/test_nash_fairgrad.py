"""Nash-MTL and FairGrad: the alpha-fair system ``G w = w^(-1/alpha)`` on the Gram.

The oracle is float64 NumPy code independent of the solver: damped Newton on
the convex ``F(w) = w'Gw/2 - sum h(w)`` directly in ``w`` (Jacobi-scaled
Hessian, Armijo backtracking), certified by its own relative residual
(<= 1e-12), and cross-checked against SciPy's ``root`` from many starts. It
is run on the float32-rounded Gram the solver sees, so the comparison
measures the solver, not the rounding of ``G``.

Tolerances (float32 solver): weights within 2e-4 relative of the oracle at
``alpha = 1`` (norms spread up to 1e-10..1e10; measured <= 3e-5), within
20 x the reported residual everywhere (the residual estimates the weights'
relative error; measured factor <= 11).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from mtgrad._src.methods.fairgrad import fairgrad
from mtgrad._src.methods.nash_mtl import nash_mtl
from mtgrad._src.solvers.nash import solve_fair

BATCH = 48  # problems per solver call: one compilation per T
TS = (2, 3, 6, 13, 40)
solve_batch = jax.jit(jax.vmap(solve_fair, in_axes=(0, None, 0)))


# ----------------------------------------------------------------------------
# Oracles (float64, test only).


def oracle(gram, alpha=1.0, iters=200):
  """Damped Newton on F(w) in w; returns (w, certified relative residual)."""
  gram = np.asarray(gram, np.float64)
  n = np.sqrt(np.diag(gram))
  q = 1 - 1 / alpha

  def objective(w):
    return 0.5 * w @ gram @ w - np.sum(np.log(w) if q == 0 else w**q / q)

  w = n ** (-2 * alpha / (1 + alpha))  # the solution for orthogonal gradients
  w = w * (np.sum(w**q) / (w @ gram @ w)) ** (alpha / (1 + alpha))
  for _ in range(iters):
    grad = gram @ w - w ** (-1 / alpha)
    hess = gram + np.diag(w ** (-1 / alpha - 1) / alpha)
    d = 1 / np.sqrt(np.diag(hess))
    step = -d * np.linalg.solve(d[:, None] * hess * d[None, :], d * grad)
    decrement = -grad @ step
    t = 1.0
    while np.any(w + t * step <= 0):
      t /= 2
    f0 = objective(w)
    while t > 1e-12 and decrement > 1e-9 * (1 + abs(f0)):
      if objective(w + t * step) <= f0 - 1e-4 * t * decrement:
        break
      t /= 2
    w = w + t * step
    if np.max(np.abs(t * step / w)) < 1e-15:
      break
  lhs = w ** (1 / alpha) * (gram @ w)
  scale = w ** (1 / alpha) * (np.abs(gram) @ w)
  return w, float(np.max(np.abs(lhs - 1) / (1 + scale)))


def scipy_roots(gram, alpha, starts, rng):
  """Certified roots of ``w^(1/alpha) (G w) = 1`` found by SciPy from many starts."""
  gram = np.asarray(gram, np.float64)

  def fun(x):
    return np.exp(x / alpha) * (gram @ np.exp(x)) - 1

  def jac(x):
    w, pw = np.exp(x), np.exp(x / alpha)
    return np.diag(pw * (gram @ w) / alpha) + pw[:, None] * gram * w[None, :]

  x0 = -np.log(np.diag(gram)) * alpha / (1 + alpha)
  roots = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    for _ in range(starts):
      sol = scipy.optimize.root(fun, x0 + rng.normal(size=len(x0)), jac=jac, method="hybr")
      if np.all(np.isfinite(sol.x)) and np.max(np.abs(fun(sol.x))) < 1e-10:
        roots.append(np.exp(sol.x))
  return roots


# ----------------------------------------------------------------------------
# Instances.

KINDS = ("random", "conflict", "scaled", "scaled_conflict")


def make_jac(rng, t, kind, spread=10.0):
  jac = rng.normal(size=(t, int(rng.integers(t, 3 * t + 5))))
  if "conflict" in kind:  # a strong shared component with random signs
    sign = rng.choice([-1.0, 1.0], size=(t, 1))
    jac += rng.uniform(1, 5) * sign * rng.normal(size=(1, jac.shape[1]))
  if "scaled" in kind:
    jac *= 10.0 ** rng.uniform(-spread, spread, size=(t, 1))
  return jac


def rounded_gram(jac):
  """The float32 Gram the solver sees, as float64."""
  return (jac @ jac.T).astype(np.float32).astype(np.float64)


def solve(grams, alpha=1.0, inits=None):
  """Solves up to BATCH problems of one size in one call."""
  grams = np.asarray(grams)
  count, t = len(grams), grams.shape[-1]
  inits = np.zeros((count, t)) if inits is None else np.asarray(inits)
  pad = BATCH - count
  grams = np.concatenate([grams, np.repeat(np.eye(t)[None], pad, 0)])
  inits = np.concatenate([inits, np.zeros((pad, t))])
  weights, info = solve_batch(
    jnp.asarray(grams, jnp.float32), jnp.float32(alpha), jnp.asarray(inits, jnp.float32)
  )
  info = jax.tree.map(lambda x: np.asarray(x)[:count], info)
  return np.asarray(weights, np.float64)[:count], info


def relative_error(w, ref):
  return np.max(np.abs(w / ref - 1), axis=-1)


# ----------------------------------------------------------------------------
# The solver against the oracle.


@pytest.mark.parametrize("t", TS)
def test_nash_system_matches_oracle(t):
  # 48 problems per T (240 in all): random, conflicting (a strong shared
  # component with random signs), and both with norms spread over 1e-10..1e10.
  rng = np.random.default_rng(t)
  kinds = [KINDS[k % 4] for k in range(BATCH)]
  grams = [rounded_gram(make_jac(rng, t, kind)) for kind in kinds]
  weights, info = solve(grams)
  assert info.converged.all(), info.residual.max()
  assert (info.iterations <= 12).all(), info.iterations.max()  # cold starts
  for kind, gram, w, res in zip(kinds, grams, weights, info.residual, strict=True):
    ref, certified = oracle(gram)
    assert certified < 1e-12
    err = relative_error(w, ref)
    assert err < 2e-4, (kind, err)
    assert err <= 20 * res + 1e-6, (kind, err, res)
    # The defining equations, in float64: w * (G w) = 1.
    assert np.max(np.abs(w * (gram @ w) - 1)) < 1e-3, kind
    # ||d||^2 = w' G w = T at the solution.
    np.testing.assert_allclose(w @ gram @ w, t, rtol=1e-3)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 2.0, 4.0])
def test_fairgrad_system_matches_oracle(alpha):
  # alpha is a traced argument: one compilation serves every alpha.
  rng = np.random.default_rng(int(alpha * 4))
  t = 6
  kinds = [KINDS[k % 4] for k in range(BATCH)]
  grams = [rounded_gram(make_jac(rng, t, kind, spread=1.5)) for kind in kinds]
  weights, info = solve(grams, alpha)
  assert info.converged.mean() >= 0.9
  for kind, gram, w, res, ok in zip(
    kinds, grams, weights, info.residual, info.converged, strict=True
  ):
    ref, certified = oracle(gram, alpha)
    assert certified < 1e-12
    err = relative_error(w, ref)
    assert err <= 20 * res + 1e-5, (kind, err, res)
    if ok:  # converged: within 20 x the tolerance
      assert err < 2.4e-2, (kind, err)
    # G w = w^(-1/alpha), relative to the size of the terms.
    lhs = w ** (1 / alpha) * (gram @ w)
    scale = w ** (1 / alpha) * (np.abs(gram) @ w)
    assert np.max(np.abs(lhs - 1) / scale) < 1e-4, kind


def test_fairgrad_badly_scaled_reports_its_accuracy():
  # alpha != 1 with norms over 1e-6..1e6: the system depends on the scales
  # and float32 may not resolve the small tasks; the residual says how well.
  rng = np.random.default_rng(11)
  for alpha in (0.5, 2.0):
    grams = [rounded_gram(make_jac(rng, 6, "scaled_conflict", spread=6)) for _ in range(BATCH)]
    weights, info = solve(grams, alpha)
    assert np.isfinite(weights).all()
    for gram, w, res in zip(grams, weights, info.residual, strict=True):
      ref, _ = oracle(gram, alpha)
      assert relative_error(w, ref) <= 20 * res + 1e-5


def test_oracle_agrees_with_scipy_from_many_starts():
  rng = np.random.default_rng(12)
  found = 0
  for alpha in (1.0, 2.0):
    for k in range(12):
      gram = rounded_gram(make_jac(rng, 2 + k % 4, KINDS[k % 4], spread=3))
      ref, _ = oracle(gram, alpha)
      roots = scipy_roots(gram, alpha, starts=10, rng=rng)
      found += bool(roots)
      for root in roots:  # the solution is unique: every root is the oracle's
        np.testing.assert_allclose(root, ref, rtol=1e-7)
  assert found >= 8


def test_float64_solver_is_exact_to_float64():
  rng = np.random.default_rng(13)
  grams = [make_jac(rng, 6, KINDS[k % 4]) for k in range(BATCH)]
  grams = np.stack([j @ j.T for j in grams])
  with jax.enable_x64(True):
    weights, info = jax.jit(jax.vmap(solve_fair))(jnp.asarray(grams, jnp.float64))
    weights, info = np.asarray(weights), jax.tree.map(np.asarray, info)
  assert info.converged.all()
  for gram, w in zip(grams, weights, strict=True):
    assert relative_error(w, oracle(gram)[0]) < 1e-10


def test_warm_start_reduces_iterations():
  rng = np.random.default_rng(14)
  t = 13
  jacs = [make_jac(rng, t, KINDS[k % 4]) for k in range(BATCH)]
  moved = [j * (1 + 0.01 * rng.normal(size=j.shape)) for j in jacs]  # the next step
  grams = [rounded_gram(j) for j in jacs]
  moved_grams = [rounded_gram(j) for j in moved]
  first, _ = solve(grams)
  _, cold = solve(moved_grams)
  warm_w, warm = solve(moved_grams, inits=first)
  assert warm.converged.all() and cold.converged.all()
  assert warm.iterations.mean() < 0.7 * cold.iterations.mean()
  assert (warm.iterations <= cold.iterations).mean() >= 0.9
  for gram, w, res in zip(moved_grams, warm_w, warm.residual, strict=True):
    err = relative_error(w, oracle(gram)[0])
    assert err < 1e-3 and err <= 20 * res + 1e-6
  # From the solution itself: one polishing step.
  _, again = solve(grams, inits=first)
  assert (again.iterations <= 1).all()


# ----------------------------------------------------------------------------
# Degenerate systems: finite weights, reported non-convergence.

solve_one = jax.jit(solve_fair)


def _gram(*rows):
  jac = np.array(rows, np.float64)
  return jac @ jac.T


def _solve_one(gram, alpha=1.0):
  w, info = solve_one(jnp.asarray(gram, jnp.float32), jnp.float32(alpha))
  return np.asarray(w, np.float64), jax.tree.map(np.asarray, info)


def test_degenerate_grams():
  rng = np.random.default_rng(15)
  g, h, k = rng.normal(size=(3, 5))
  no_solution = {  # zero gradients, or 0 in the convex hull (Pareto stationary)
    "zero_row": np.array([[0.0, 0.0], [0.0, 1.0]]),
    "all_zero": np.zeros((2, 2)),
    "opposite": _gram(g, -g),
    "opposite_scaled": _gram(g, -2.5 * g),
    "zero_and_opposite": _gram(0 * g, g, -g),
    "three_in_a_plane": _gram(g, h, -(g + h)),
  }
  for name, gram in no_solution.items():
    for alpha in (1.0, 0.5, 3.0):
      w, info = _solve_one(gram, alpha)
      assert np.isfinite(w).all(), name
      assert not info.converged and info.residual > 0.1, name
  # A zero gradient gets weight 0; the others are solved among themselves.
  w, info = _solve_one(_gram(g, 0 * g, h))
  assert w[1] == 0 and info.residual == 1.0
  np.testing.assert_allclose(w[[0, 2]], oracle(_gram(g, h))[0], rtol=1e-5)
  # Pareto stationary with a third task: the cancelling pair's combination
  # nearly vanishes; the update is (up to rounding) orthogonal to it and
  # positive on the third task.
  jac = np.stack([g, -g, h])
  w, info = _solve_one(jac @ jac.T)
  d = w @ jac
  assert not info.converged
  assert abs(d @ g) <= 1e-2 * np.linalg.norm(d) * np.linalg.norm(g)
  assert d @ h > 0
  # Solvable although rank-deficient: duplicated tasks, gradients in a plane
  # whose cone excludes 0.
  solvable = {
    "duplicated": _gram(g, g, h),
    "duplicated_scaled": _gram(g, 3 * g, h),
    "planar": _gram(g, g + 0.3 * k, g - 0.2 * k),
  }
  for name, gram in solvable.items():
    w, info = _solve_one(gram)
    assert info.converged, name
    assert relative_error(w, oracle(gram)[0]) < 1e-4, name
  w, _ = _solve_one(_gram(g, g, h))
  assert w[0] == pytest.approx(w[1], rel=1e-6)


def test_nan_in_nan_out_and_terminates():
  for gram in ([[1.0, np.nan], [np.nan, 1.0]], [[1.0, 0.0], [0.0, np.inf]]):
    for alpha in (1.0, 2.0):
      w, info = _solve_one(np.array(gram), alpha)
      assert np.isnan(w).all() and np.isnan(info.residual)
      assert not info.converged and info.iterations == 0


# ----------------------------------------------------------------------------
# The transforms, on [3, 7] task gradients split over two leaves. Each
# transform is built and compiled once (compilation dominates the run time).


def _tree(matrix):
  matrix = jnp.asarray(matrix, jnp.float32)
  grads = {"a": matrix[:, :4].reshape(-1, 2, 2), "b": matrix[:, 4:]}
  params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
  return grads, params


def _flat(update):
  return np.concatenate([np.asarray(update["a"], np.float64).ravel(), np.asarray(update["b"])])


NASH = nash_mtl(num_tasks=3)
NASH_NOCLIP = nash_mtl(num_tasks=3, max_norm=None)
FAIR = fairgrad(num_tasks=3)
FAIR2 = fairgrad(2.0, num_tasks=3)
_JITTED = {}


def _run(tx, matrices):
  """``[(update, state)]`` of a sequence of jitted steps from a fresh state."""
  update = _JITTED.setdefault(id(tx), jax.jit(tx.update))
  _, params = _tree(matrices[0])
  state = tx.init(params)
  out = []
  for m in matrices:
    d, state = update(_tree(m)[0], state, params)
    out.append((_flat(d), state))
  return out


def test_nash_mtl_and_fairgrad_alpha_one_agree():
  rng = np.random.default_rng(16)
  ms = [rng.normal(size=(3, 7)) * 10.0 ** rng.uniform(-4, 4, size=(3, 1)) for _ in range(3)]
  nash = _run(NASH_NOCLIP, ms)
  for (d1, s1), (d2, s2) in zip(nash, _run(FAIR, ms), strict=True):
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
    np.testing.assert_allclose(s1.weights, s2.weights, rtol=1e-6)
    # ||d||^2 = T: the clipped update (max_norm=1) is d / sqrt(T).
  for (d1, _), (d2, _) in zip(nash, _run(NASH, ms), strict=True):
    np.testing.assert_allclose(d2, d1 / np.sqrt(3), rtol=1e-5)


def test_traced_hyperparameters():
  # alpha and max_norm injected as state hyperparameters (traced), one
  # compilation for every value.
  rng = np.random.default_rng(17)
  m = rng.normal(size=(3, 7)) * np.array([[1e-3], [1.0], [1e3]])
  grads, params = _tree(m)
  fair = optax.inject_hyperparams(fairgrad, static_args=("num_tasks",))(alpha=2.0, num_tasks=3)
  state = fair.init(params)
  update = jax.jit(fair.update)
  d, _ = update(grads, state, params)
  np.testing.assert_allclose(_flat(d), _run(FAIR2, [m])[0][0], rtol=1e-5)
  state.hyperparams["alpha"] = jnp.asarray(1.0)
  d, _ = update(grads, state, params)
  np.testing.assert_allclose(_flat(d), _run(FAIR, [m])[0][0], rtol=1e-5)

  nash = optax.inject_hyperparams(nash_mtl, static_args=("num_tasks",))(max_norm=1.0, num_tasks=3)
  state = nash.init(params)
  update = jax.jit(nash.update)
  unclipped = _run(NASH_NOCLIP, [m])[0]
  for max_norm in (1.0, 0.25, 0.0, 10.0):
    state.hyperparams["max_norm"] = jnp.asarray(max_norm)
    d, new = update(grads, state, params)
    d = _flat(d)
    expected = np.sqrt(3) if max_norm in (0.0, 10.0) else max_norm  # ||d_nash|| = sqrt(T)
    assert np.linalg.norm(d) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(d, unclipped[0] * expected / np.sqrt(3), rtol=1e-4)
    np.testing.assert_allclose(d, np.asarray(new.inner_state.weights, np.float64) @ m, rtol=1e-4)


def test_max_norm_clip():
  rng = np.random.default_rng(18)
  m = rng.normal(size=(3, 7)) * np.array([[1e-3], [1.0], [1e3]])
  ((d, state),) = _run(NASH, [m])
  assert np.linalg.norm(d) == pytest.approx(1.0, rel=1e-5)  # ||d_nash|| = sqrt(3) > 1
  ws = state.weighting_state
  np.testing.assert_allclose(state.weights, ws.alpha / np.sqrt(3), rtol=1e-4)
  ((d, state),) = _run(NASH_NOCLIP, [m])
  assert np.linalg.norm(d) == pytest.approx(np.sqrt(3), rel=1e-4)
  np.testing.assert_array_equal(state.weights, state.weighting_state.alpha)
  # FairGrad clips only when asked; alpha = 1 is Nash-MTL's direction.
  ((d, _),) = _run(FAIR, [m])
  assert np.linalg.norm(d) == pytest.approx(np.sqrt(3), rel=1e-4)


def test_update_every_reuses_weights():
  rng = np.random.default_rng(19)
  ms = [rng.normal(size=(3, 7)) + 2.0 * rng.normal(size=(1, 7)) for _ in range(7)]
  steps = _run(nash_mtl(num_tasks=3, update_every=3), ms)
  for k, (d, state) in enumerate(steps):
    ws = state.weighting_state
    assert int(ws.count) == k + 1
    if k % 3 == 0:  # a solve: the weights solve this step's system
      ref, _ = oracle(rounded_gram(ms[k]))
      assert relative_error(np.asarray(ws.alpha, np.float64), ref) < 1e-4
      assert int(ws.info.iterations) > 0
    else:  # reuse of the last solve's weights and report
      previous = steps[k - 1][1].weighting_state
      np.testing.assert_array_equal(ws.alpha, previous.alpha)
      assert ws.info == previous.info
    # The clip always uses the current gradients.
    alpha = np.asarray(ws.alpha, np.float64)
    norm = np.linalg.norm(alpha @ ms[k])
    np.testing.assert_allclose(state.weights, alpha * min(1, 1 / norm), rtol=1e-4)
    weights = np.asarray(state.weights, np.float64)
    np.testing.assert_allclose(d, weights @ ms[k], rtol=1e-4, atol=1e-6)


def test_warm_start_through_the_transform():
  # The second of two close steps (warm) against the same step from a fresh
  # state (cold).
  rng = np.random.default_rng(20)
  for tx in (NASH, FAIR2):
    warm, cold = [], []
    for _ in range(6):
      sign = rng.choice([-1.0, 1.0], size=(3, 1))
      m = (rng.normal(size=(3, 7)) + 3 * sign * rng.normal(size=(1, 7))) * 10.0 ** rng.uniform(
        -3, 3, size=(3, 1)
      )
      moved = m * (1 + 0.01 * rng.normal(size=m.shape))
      warm.append(int(_run(tx, [m, moved])[1][1].weighting_state.info.iterations))
      cold.append(int(_run(tx, [moved])[0][1].weighting_state.info.iterations))
    assert all(w <= c for w, c in zip(warm, cold, strict=True)), (warm, cold)
    assert sum(warm) < 0.7 * sum(cold), (warm, cold)


def test_scale_invariance_and_permutation_with_clip():
  # The bargaining update depends on the directions only: degree 0 in J and
  # invariant to rescaling any task, with the clipping too; two steps, so the
  # warm start is exercised.
  rng = np.random.default_rng(21)
  ms = [rng.normal(size=(3, 7)) + rng.normal(size=(1, 7)) for _ in range(2)]
  c = 10.0 ** rng.uniform(-8, 8, size=(3, 1))
  perm = np.array([2, 0, 1])
  for tx in (NASH, NASH_NOCLIP, FAIR):
    base = [d for d, _ in _run(tx, ms)]
    for other in ([c * m for m in ms], [1e-6 * m for m in ms], [m[perm] for m in ms]):
      for d, e in zip(base, [d for d, _ in _run(tx, other)], strict=True):
        np.testing.assert_allclose(e, d, rtol=1e-4, atol=1e-4 * np.linalg.norm(d))
  # FairGrad with alpha != 1 is neither: d(cJ) = c^((1-alpha)/(1+alpha)) d(J).
  base = _run(FAIR2, ms[:1])[0][0]
  scaled = _run(FAIR2, [1e3 * ms[0]])[0][0]
  np.testing.assert_allclose(scaled, 1e3 ** (-1 / 3) * base, rtol=1e-4)
  tilted = _run(FAIR2, [c * ms[0]])[0][0]
  assert not np.allclose(tilted, base, rtol=1e-2)


def test_blockwise_and_zero_gradient_heads():
  rng = np.random.default_rng(22)
  m = rng.normal(size=(3, 7))
  m[1, :4] = 0  # task 1 has no gradient on leaf "a"
  ((d, state),) = _run(nash_mtl(num_tasks=3, blocks="leaf", max_norm=None), [m])
  assert state.weights.shape == (2, 3) and state.weighting_state.alpha.shape == (2, 3)
  np.testing.assert_array_equal(state.weighting_state.info.converged, [False, True])
  assert state.weights[0, 1] == 0
  for block, cols in enumerate((slice(0, 4), slice(4, 7))):
    sub = m[:, cols]
    np.testing.assert_allclose(state.weights[block], _solve_one(sub @ sub.T)[0], rtol=1e-5)
  assert np.isfinite(d).all()


def test_nan_gradients_and_recovery():
  rng = np.random.default_rng(23)
  m = rng.normal(size=(3, 7))
  bad = m.copy()
  bad[0, 0] = np.nan
  for tx in (NASH, FAIR):
    (d1, s1), (d2, s2) = _run(tx, [bad, m])
    assert np.isnan(d1).all() and not s1.weighting_state.info.converged
    assert np.isfinite(d2).all() and s2.weighting_state.info.converged


def test_low_precision_gradients_and_validation():
  rng = np.random.default_rng(24)
  grads, params = _tree(rng.normal(size=(3, 7)))
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  d, _ = jax.jit(NASH.update)(grads, NASH.init(params), params)
  assert all(x.dtype == jnp.bfloat16 and np.isfinite(x).all() for x in jax.tree.leaves(d))
  with pytest.raises(ValueError, match="num_tasks"):
    nash_mtl()
  with pytest.raises(ValueError, match="update_every"):
    nash_mtl(num_tasks=2, update_every=0)
  with pytest.raises(ValueError, match="alpha"):
    fairgrad(0.0)
  with pytest.raises(ValueError, match="alpha"):
    fairgrad(-1.0)
