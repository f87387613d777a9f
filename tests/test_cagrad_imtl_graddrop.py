"""CAGrad, IMTL-G and GradDrop against float64 oracles and their defining identities."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

from mtgrad._src import tree
from mtgrad._src.methods.cagrad import cagrad
from mtgrad._src.methods.graddrop import graddrop
from mtgrad._src.methods.imtl_g import imtl_g
from mtgrad._src.methods.mean import mean
from mtgrad._src.solvers.cagrad import project_simplex_scaled
from mtgrad._src.solvers.cagrad import scale_free
from mtgrad._src.solvers.cagrad import solve_cagrad
from mtgrad._src.solvers.simplex import project_simplex


def _f32(matrix) -> np.ndarray:
  """The float32 gradients a transform sees, back in float64 for the oracles."""
  return np.asarray(np.asarray(matrix, np.float32), np.float64)


@functools.cache
def _jitted(factory, *args, **kwargs):
  tx = factory(*args, **kwargs)

  def run(grads):
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    return tx.update(grads, tx.init(params), params)

  return jax.jit(run)


def _apply(factory, matrix, *args, **kwargs):
  """One jitted update of ``factory(*args, **kwargs)`` on a ``[T, D]`` matrix."""
  updates, state = _jitted(factory, *args, **kwargs)({"w": jnp.asarray(matrix, jnp.float32)})
  return np.asarray(updates["w"], np.float64), state


@functools.cache
def _jitted_cagrad(**kwargs):
  def run(grads, c):  # c traced: one compilation per shape, not per value
    tx = cagrad(c, **kwargs)
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    return tx.update(grads, tx.init(params), params)

  return jax.jit(run)


def _cagrad(matrix, c, **kwargs):
  grads = {"w": jnp.asarray(matrix, jnp.float32)}
  updates, state = _jitted_cagrad(**kwargs)(grads, jnp.float32(c))
  return np.asarray(updates["w"], np.float64), state


# ------------------------------------------------------------------ oracles


def _cagrad_objective(gram, c):
  t = gram.shape[0]
  linear = gram.sum(1) / t
  kappa = c * np.sqrt(max(gram.sum(), 0.0)) / t
  return lambda w: w @ linear + kappa * np.sqrt(max(w @ gram @ w, 0.0))


def _slsqp_cagrad(gram, c):
  """float64 SciPy oracle of the CAGrad dual (multi-start SLSQP)."""
  t = gram.shape[0]
  g = gram / np.max(np.diag(gram))  # same argmin, better conditioned
  linear = g.sum(1) / t
  kappa = c * np.sqrt(g.sum()) / t
  f = _cagrad_objective(g, c)

  def jac(w):
    q = max(w @ g @ w, 1e-300)
    return linear + kappa * (g @ w) / np.sqrt(q)

  best = None
  for x0 in [np.full(t, 1 / t), *(0.9 * np.eye(t)[i] + 0.1 / t for i in range(t))]:
    res = minimize(
      f,
      x0,
      jac=jac,
      method="SLSQP",
      bounds=[(0, 1)] * t,
      constraints={"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(t)},
      options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = np.clip(res.x, 0, None)
    w /= w.sum()
    if best is None or f(w) < f(best):
      best = w
  return best


def _kkt_enumeration(gram, linear, kappa):
  """Exact minimiser of w.linear + kappa sqrt(w G w) on the simplex (full-rank G).

  Enumerates supports S; on S the KKT conditions give w_S in closed form
  (G_S w_S = (mu 1 - linear_S) / s, a quadratic for mu); keeps the feasible
  one that is optimal off S.
  """
  t = gram.shape[0]
  best = None
  for size in range(1, t + 1):
    for support in itertools.combinations(range(t), size):
      s_idx = list(support)
      g_s = gram[np.ix_(s_idx, s_idx)]
      x = np.linalg.solve(g_s, np.ones(size))
      y = np.linalg.solve(g_s, linear[s_idx])
      a, b, c = x.sum(), y.sum(), linear[s_idx] @ y
      if kappa == 0:
        continue
      disc = b * b - a * (c - kappa * kappa)
      if disc <= 0:
        continue
      root = np.sqrt(disc)
      mu = (root + b) / a
      w_s = (mu * x - y) / root
      if np.any(w_s < -1e-12):
        continue
      w = np.zeros(t)
      w[s_idx] = np.clip(w_s, 0, None)
      w /= w.sum()
      grad = linear + kappa * gram @ w / np.sqrt(w @ gram @ w)
      if np.all(grad >= mu - 1e-9 * np.abs(grad).max()):
        value = w @ linear + kappa * np.sqrt(w @ gram @ w)
        if best is None or value < best[1]:
          best = (w, value)
  return best[0]


def _cagrad_oracle_update(matrix, c):
  gram = matrix @ matrix.T
  t = matrix.shape[0]
  g0 = matrix.mean(0)
  kappa = c * np.linalg.norm(g0)
  w = _kkt_enumeration(gram, gram.sum(1) / t, kappa)
  gw = w @ matrix
  return g0 + kappa * gw / np.linalg.norm(gw)


def _min_norm_oracle(matrix):
  """MGDA min-norm point of the convex hull, float64, by support enumeration."""
  gram = matrix @ matrix.T
  t = gram.shape[0]
  best = None
  for size in range(1, t + 1):
    for support in itertools.combinations(range(t), size):
      s_idx = list(support)
      x = np.linalg.solve(gram[np.ix_(s_idx, s_idx)], np.ones(size))
      if np.any(x <= 0):
        continue
      w = np.zeros(t)
      w[s_idx] = x / x.sum()
      value = w @ gram @ w
      if np.all(gram @ w >= value * (1 - 1e-9)) and (best is None or value < best[1]):
        best = (w, value)
  return best[0] @ matrix


# ------------------------------------------------------------------ CAGrad


_project = jax.jit(jax.vmap(project_simplex_scaled))


def test_simplex_projection_in_a_metric():
  rng = np.random.default_rng(0)
  for t in (1, 2, 3, 5, 8):
    v = rng.standard_normal((12, t)) * rng.choice([0.1, 1.0, 30.0], (12, 1))
    p = 10.0 ** rng.uniform(-4, 4, (12, t))
    got = np.asarray(_project(jnp.asarray(v, jnp.float32), jnp.asarray(p, jnp.float32)))
    lo, hi = np.full((12, 1), -1e15), np.full((12, 1), 1e15)  # float64 bisection
    for _ in range(400):
      tau = 0.5 * (lo + hi)
      above = np.maximum(v - tau / p, 0).sum(1, keepdims=True) > 1
      lo, hi = np.where(above, tau, lo), np.where(above, hi, tau)
    np.testing.assert_allclose(got, np.maximum(v - tau / p, 0), atol=2e-6)
    euclid = _project(jnp.asarray(v, jnp.float32), jnp.ones((12, t), jnp.float32))
    expected = jax.vmap(project_simplex)(jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(euclid, expected, atol=2e-6)
  # A coordinate with a tiny metric weight is cheap to move: it absorbs the
  # constraint, to full precision despite its huge value.
  w = _project(jnp.array([[3e9, 0.25, -1.0]]), jnp.array([[1e-20, 1.0, 1.0]]))
  np.testing.assert_array_equal(w, [[0.75, 0.25, 0.0]])


def test_cagrad_with_c_zero_is_exactly_the_mean():
  rng = np.random.default_rng(1)
  for t in (2, 3, 5):
    matrix = rng.standard_normal((t, 8)) * 10.0 ** rng.uniform(-4, 4, (t, 1))
    expected, _ = _apply(mean, matrix)
    got, state = _cagrad(matrix, 0.0, num_tasks=t)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(state.weights, np.full(t, np.float32(1 / t)))
  for rescale in ("1+c", "1+c^2"):
    np.testing.assert_array_equal(_cagrad(matrix, 0.0, rescale=rescale, num_tasks=5)[0], expected)
  # Traced c (inject_hyperparams), set to 0 inside jit.
  matrix = rng.standard_normal((4, 8))
  tx = optax.inject_hyperparams(cagrad)(c=0.5)
  grads = {"w": jnp.asarray(matrix, jnp.float32)}
  state = tx.init({"w": jnp.zeros(8)})
  state.hyperparams["c"] = jnp.zeros_like(state.hyperparams["c"])
  got, _ = jax.jit(tx.update)(grads, state)
  np.testing.assert_array_equal(got["w"], _apply(mean, matrix)[0].astype(np.float32))


@functools.cache
def _jit_solver():
  return jax.jit(lambda gram, c: solve_cagrad(*scale_free(gram), c))


def test_cagrad_dual_against_float64_slsqp():
  rng = np.random.default_rng(2)
  solve = _jit_solver()
  for trial in range(40):
    t = (2, 3, 5, 8, 10)[trial % 5]
    dim = (3, 16)[trial % 2]  # rank-deficient when dim < t
    matrix = rng.standard_normal((t, dim))
    if trial % 3 == 1:
      matrix *= 10.0 ** rng.uniform(-3, 3, (t, 1))  # badly scaled
    if trial % 3 == 2:
      matrix += 2.0 * rng.standard_normal(dim)  # mostly agreeing tasks
    c = (0.1, 0.5, 0.9, 2.0)[trial % 4]
    matrix = _f32(matrix)
    gram = matrix @ matrix.T
    w, info = solve(jnp.asarray(gram, jnp.float32), jnp.float32(c))
    w = np.asarray(w, np.float64)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    f = _cagrad_objective(gram, c)
    norm_g0 = np.linalg.norm(matrix.mean(0))
    scale = (1 + c) * norm_g0 * np.sqrt(np.max(np.diag(gram)))
    oracle = _slsqp_cagrad(gram, c)
    gap = (f(w) - f(oracle)) / scale
    assert gap <= 1e-5, f"trial {trial}: objective {f(w)} vs SLSQP {f(oracle)}"
    assert bool(info.converged) or gap <= 1e-6, info


def test_cagrad_update_matches_exact_kkt_oracle():
  rng = np.random.default_rng(3)
  for trial in range(24):
    t = 2 + trial % 5
    matrix = rng.standard_normal((t, 8))
    if trial % 2:
      matrix *= 10.0 ** rng.uniform(-3, 3, (t, 1))
    if trial % 3 == 0:
      matrix += 1.5 * rng.standard_normal(8)
    c = (0.2, 0.5, 0.9, 1.5)[trial % 4]
    matrix = _f32(matrix)
    got, state = _cagrad(matrix, c, num_tasks=t)
    expected = _cagrad_oracle_update(matrix, c)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.linalg.norm(expected))
    # Linear: the update is the state's weights applied to the gradients.
    np.testing.assert_allclose(
      np.asarray(state.weights, np.float64) @ matrix, got, atol=1e-5 * np.linalg.norm(got)
    )


def test_cagrad_rescale_options():
  rng = np.random.default_rng(4)
  matrix = rng.standard_normal((5, 8))
  c = 0.7
  plain, state = _cagrad(matrix, c, num_tasks=5)
  for rescale, factor in (("none", 1.0), ("1+c", 1 + c), ("1+c^2", 1 + c * c)):
    got, other = _cagrad(matrix, c, rescale=rescale, num_tasks=5)
    np.testing.assert_allclose(got, plain / factor, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(other.weights, state.weights / factor, rtol=1e-6)
  with pytest.raises(ValueError, match="rescale"):
    cagrad(c, rescale=1)
  with pytest.raises(ValueError, match="c must be"):
    cagrad(-0.1)


def test_cagrad_large_c_approaches_mgda_direction():
  rng = np.random.default_rng(5)
  for t in (2, 3, 4, 5):
    # A shared component keeps the origin out of the convex hull.
    matrix = _f32(rng.standard_normal((t, 8)) + 1.5 * rng.standard_normal(8))
    mgda = _min_norm_oracle(matrix)
    for c in (1e2, 1e4):
      got, _ = _cagrad(matrix, c, num_tasks=t)
      cosine = got @ mgda / (np.linalg.norm(got) * np.linalg.norm(mgda))
      assert 1 - cosine < 10 / c**2 + 1e-6, (t, c, cosine)
      # d = g0 + c ||g0|| unit(g_w): its length is about c ||g0||.
      np.testing.assert_allclose(
        np.linalg.norm(got), c * np.linalg.norm(matrix.mean(0)), rtol=2 / c + 1e-5
      )


def test_cagrad_degenerate_inputs():
  g = np.array([1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0, 2.0])
  # Opposite tasks: g0 = 0, the update is the mean (zero), finite.
  got, state = _cagrad(np.stack([g, -g]), 0.5, num_tasks=2)
  np.testing.assert_array_equal(got, 0.0)
  # Zero gradients: zero update; a zero task among others: finite.
  got, _ = _cagrad(np.zeros((3, 8)), 0.5, num_tasks=3)
  np.testing.assert_array_equal(got, 0.0)
  got, _ = _cagrad(np.stack([g, np.zeros(8), 0.3 * g[::-1]]), 0.5, num_tasks=3)
  assert np.all(np.isfinite(got))
  # Norms from 1e-10 to 1e10: finite, and linear in the state's weights.
  rng = np.random.default_rng(6)
  matrix = rng.standard_normal((4, 8)) * np.array([[1e-10], [1e-3], [1.0], [1e10]])
  got, state = _cagrad(matrix, 0.5, num_tasks=4)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(
    np.asarray(state.weights, np.float64) @ _f32(matrix), got, rtol=1e-4, atol=1e-4 * 1e10
  )


def test_cagrad_nan_in_nan_out_and_reports_solver_info():
  rng = np.random.default_rng(7)
  matrix = rng.standard_normal((3, 8))
  _, state = _cagrad(matrix, 0.5, num_tasks=3)
  info = state.weighting_state.info
  assert bool(info.converged) and int(info.iterations) >= 1
  assert info.iterations.dtype == jnp.int32 and info.residual.dtype == jnp.float32
  matrix[1, 2] = np.nan
  for c in (0.0, 0.5):
    got, state = _cagrad(matrix, c, num_tasks=3)
    assert np.isnan(got).any()
  assert not bool(state.weighting_state.info.converged)


def test_cagrad_block_wise_and_traced_c():
  rng = np.random.default_rng(8)
  grads = {
    "a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((3, 2, 2)), jnp.float32),
  }
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  tx = cagrad(0.5, num_tasks=3, blocks="leaf")
  updates, state = tx.update(grads, tx.init(params), params)
  assert state.weights.shape == (2, 3)
  assert state.weighting_state.info.converged.shape == (2,)
  for i, name in enumerate(("a", "b")):
    alone, _ = _cagrad(np.asarray(grads[name]).reshape(3, -1), 0.5)
    np.testing.assert_allclose(np.ravel(updates[name]), alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights[i] @ grads[name].reshape(3, -1), alone, rtol=1e-5)
  # c injected (traced), compared with the direct transform.
  matrix = rng.standard_normal((3, 8))
  injected = optax.inject_hyperparams(cagrad, static_args=("max_iters", "num_tasks"))(
    c=0.5, num_tasks=3
  )
  grads = {"w": jnp.asarray(matrix, jnp.float32)}
  state = injected.init({"w": jnp.zeros(8)})
  update = jax.jit(injected.update)
  first, _ = update(grads, state)
  np.testing.assert_allclose(first["w"], _cagrad(matrix, 0.5, num_tasks=3)[0], rtol=1e-6)
  state.hyperparams["c"] = jnp.asarray(2.0, jnp.float32)
  second, _ = update(grads, state)
  np.testing.assert_allclose(second["w"], _cagrad(matrix, 2.0, num_tasks=3)[0], rtol=1e-6)
  assert not np.allclose(first["w"], second["w"])


# ------------------------------------------------------------------ IMTL-G


def _unit(matrix):
  return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_imtl_g_equal_projections_under_huge_scale_spread():
  rng = np.random.default_rng(10)
  for t in (2, 3, 5, 8):
    for _ in range(3):
      scales = 10.0 ** rng.uniform(-8, 8, (t, 1))
      matrix = _f32(rng.standard_normal((t, 12)) * scales)
      got, state = _apply(imtl_g, matrix, num_tasks=t)
      weights = np.asarray(state.weights, np.float64)
      np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
      proj = _unit(matrix) @ got
      assert np.ptp(proj) <= 1e-4 * np.abs(proj).max(), proj
      # Against the float64 formula G^-1 sqrt(diag G), normalised.
      gram = matrix @ matrix.T
      v = np.linalg.solve(gram, np.sqrt(np.diag(gram)))
      np.testing.assert_allclose(weights, v / v.sum(), rtol=2e-4, atol=1e-12)


def test_imtl_g_matches_the_papers_closed_form():
  rng = np.random.default_rng(11)
  for t in (2, 3, 4, 6):
    matrix = _f32(rng.standard_normal((t, 9)) * 10.0 ** rng.uniform(-2, 2, (t, 1)))
    units = _unit(matrix)
    diffs = matrix[:1] - matrix[1:]  # D: rows g_1 - g_t
    unit_diffs = units[:1] - units[1:]  # U: rows u_1 - u_t
    alpha = matrix[0] @ unit_diffs.T @ np.linalg.inv(diffs @ unit_diffs.T)
    paper = np.concatenate([[1 - alpha.sum()], alpha])
    _, state = _apply(imtl_g, matrix, num_tasks=t)
    np.testing.assert_allclose(state.weights, paper, rtol=1e-4, atol=1e-6)


def test_imtl_g_rank_deficient_against_float64_pinv():
  rng = np.random.default_rng(12)
  g, h = rng.standard_normal(6), rng.standard_normal(6)
  base = rng.standard_normal((2, 6))
  consistent = {
    "duplicated": np.stack([g, g, h]),
    "equal_norms_T4_in_2d": _unit(rng.standard_normal((4, 2)) @ base),
    "three_in_a_plane_equal_norms": _unit(np.stack([g, h, g + 0.5 * h])) * 2.0,
    "scaled_duplicate": np.stack([g, 3.0 * g, h]),
  }
  for name, matrix in consistent.items():
    matrix = _f32(matrix)
    got, state = _apply(imtl_g, matrix, num_tasks=len(matrix))
    np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-5, err_msg=name)
    gram = matrix @ matrix.T
    v = np.linalg.pinv(gram, rcond=1e-10) @ np.sqrt(np.diag(gram))
    expected = (v / v.sum()) @ matrix
    if name in ("duplicated", "scaled_duplicate"):  # equal projections attainable
      proj = _unit(matrix) @ got
      assert np.ptp(proj) <= 1e-4 * np.abs(proj).max(), (name, proj)
    if name != "scaled_duplicate":
      np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), err_msg=name)
      continue
    # Dependent tasks of different norms: the same line as G^+ sqrt(diag G),
    # but sum(w) = 1 no longer fixes the weights. G^+ takes the least-norm
    # v (w ~ (1, 3): contributions g and 9g); K^+ 1 the least-norm v ||g_t||,
    # so the duplicates contribute equally (3g and 3g).
    cosine = got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
    np.testing.assert_allclose(state.weights[0], 3.0 * state.weights[1], rtol=1e-5)
  # Inconsistent (no direction has equal projections on g and -g): the
  # least-squares fit over unit vectors gives 0 for the pair, so the update
  # is orthogonal to g and has projection 1/sum(v) on h's unit vector.
  matrix = _f32(np.stack([g, -2.5 * g, h]))
  got, state = _apply(imtl_g, matrix, num_tasks=3)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got @ g, 0.0, atol=1e-5 * np.linalg.norm(got) * np.linalg.norm(g))
  _, state = _apply(imtl_g, _f32(np.stack([g, -g])), num_tasks=2)
  np.testing.assert_array_equal(state.weights, 0.0)


def test_imtl_g_zero_tasks_nan_and_cutoff():
  rng = np.random.default_rng(13)
  matrix = rng.standard_normal((3, 5))
  with_zero = np.stack([matrix[0], np.zeros(5), matrix[1], matrix[2]])
  got, state = _apply(imtl_g, with_zero, num_tasks=4)
  alone, _ = _apply(imtl_g, matrix)
  assert state.weights[1] == 0
  np.testing.assert_allclose(got, alone, rtol=1e-5)
  got, _ = _apply(imtl_g, np.zeros((3, 5)))
  np.testing.assert_array_equal(got, 0.0)
  # Nearly collinear tasks (cosine 1 - 1e-8) are one direction under rcond.
  g = rng.standard_normal(5)
  twin = g + 1e-4 * np.linalg.norm(g) * _unit(rng.standard_normal((1, 5)))[0]
  got, state = _apply(imtl_g, np.stack([g, twin, 3.0 * matrix[0]]))
  assert np.all(np.isfinite(got)) and np.linalg.norm(got) < 10 * np.abs(matrix).max()
  assert int(state.weighting_state.rank) == 2
  assert int(_apply(imtl_g, matrix)[1].weighting_state.rank) == 3
  matrix[0, 1] = np.nan
  assert np.isnan(_apply(imtl_g, matrix)[0]).all()
  with pytest.raises(ValueError, match="rcond"):
    imtl_g(rcond=1.5)


def test_imtl_g_scale_behaviour():
  rng = np.random.default_rng(14)
  matrix = _f32(rng.standard_normal((3, 7)))
  got, _ = _apply(imtl_g, matrix)
  np.testing.assert_allclose(_apply(imtl_g, 7.0 * matrix)[0], 7.0 * got, rtol=1e-5)
  # Rescaling one loss keeps the line of the update, not its length.
  scaled, _ = _apply(imtl_g, matrix * np.array([[1.0], [100.0], [1.0]]))
  cosine = scaled @ got / (np.linalg.norm(scaled) * np.linalg.norm(got))
  np.testing.assert_allclose(abs(cosine), 1.0, rtol=1e-5)
  assert not np.allclose(scaled, got, rtol=1e-3)


# ------------------------------------------------------------------ GradDrop


def _drop(matrix, key=0, **kwargs):
  return _apply(graddrop, matrix, key, **kwargs)[0]


def test_graddrop_keeps_coordinates_where_tasks_agree():
  rng = np.random.default_rng(20)
  magnitudes = np.abs(rng.standard_normal((4, 64)))
  signs = rng.choice([-1.0, 1.0], size=64)
  matrix = magnitudes * signs  # one sign per coordinate
  matrix[1, ::5] = 0.0  # zeros do not break agreement
  for key in range(5):
    np.testing.assert_allclose(_drop(matrix, key), _f32(matrix).sum(0), rtol=1e-6)


def test_graddrop_mask_statistics():
  # Columns with purity P = 0.5 (1 + sum / sum|.|) of 0.25, 0.5, 0.9.
  columns = np.array([[1.0, -3.0], [2.0, -2.0], [9.0, -1.0]])  # [kind, task]
  purity = 0.5 * (1 + columns.sum(1) / np.abs(columns).sum(1))
  n = 20000
  matrix = np.repeat(columns.T, n, axis=1)  # [2, 3n]
  tx = graddrop(jax.random.key(3))
  grads = {"w": jnp.asarray(matrix, jnp.float32)}
  state = tx.init({"w": jnp.zeros(3 * n)})
  update = jax.jit(tx.update)
  seen = []
  for _ in range(3):  # successive steps: fresh masks from the split key
    out, state = update(grads, state)
    out = np.asarray(out["w"]).reshape(3, n)
    positive = out == columns[:, :1]
    negative = out == columns[:, 1:]
    assert np.all(positive ^ negative)  # exactly one sign survives
    np.testing.assert_allclose(positive.mean(1), purity, atol=5 * np.sqrt(0.25 / n))
    seen.append(positive)
  assert not np.array_equal(seen[0], seen[1])
  # Coordinates are independent: the two halves of a column disagree often.
  assert 0.1 < np.mean(seen[0][1, : n // 2] != seen[0][1, n // 2 :]) < 0.9


def test_graddrop_leak():
  rng = np.random.default_rng(21)
  matrix = _f32(rng.standard_normal((3, 200)))
  plain = matrix.sum(0)
  np.testing.assert_allclose(_drop(matrix, leak=1.0), plain, rtol=1e-5, atol=1e-6)
  # The paper's leak: each task's mask m -> l + (1 - l) m, same masks.
  dropped = _drop(matrix, key=4)
  for leak in (0.25, 0.8):
    np.testing.assert_allclose(
      _drop(matrix, key=4, leak=leak), leak * plain + (1 - leak) * dropped, rtol=1e-5, atol=1e-5
    )
  # Per-task leak: task 0 always passes in full, the others are masked.
  masked = _drop(matrix, key=4, leak=(1.0, 0.0, 0.0)) - matrix[0]
  for j in range(200):
    choices = {0.0, matrix[1, j], matrix[2, j], matrix[1, j] + matrix[2, j]}
    assert any(abs(masked[j] - x) < 1e-5 for x in choices)
  with pytest.raises(ValueError, match="leak"):
    graddrop(0, leak=1.5)
  with pytest.raises(ValueError, match="leak"):
    graddrop(0, leak=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="leak"):
    graddrop(0, leak=jnp.ones(2)).update({"w": jnp.ones((3, 2))}, graddrop(0).init({}))


def test_graddrop_determinism_and_invariances():
  rng = np.random.default_rng(22)
  matrix = _f32(rng.standard_normal((3, 300)))
  first = _drop(matrix, key=7)
  np.testing.assert_array_equal(first, _drop(matrix, key=7))
  assert not np.array_equal(first, _drop(matrix, key=8))
  # P is a ratio: scaling all gradients by c > 0 scales the output by c.
  np.testing.assert_allclose(_drop(4.0 * matrix, key=7), 4.0 * first, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_drop(matrix[::-1], key=7), first, rtol=1e-5, atol=1e-6)


def test_graddrop_zero_nan_dtypes_and_validation():
  np.testing.assert_array_equal(_drop(np.zeros((3, 10))), 0.0)
  matrix = np.ones((2, 6))
  matrix[1, 2] = -1.0
  matrix[0, 4] = np.nan
  out = _drop(matrix)
  assert np.isnan(out[4]) and np.isfinite(np.delete(out, 4)).all()
  grads = {
    "w": jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.bfloat16),
    "b": jnp.ones((2,), jnp.bfloat16),
  }
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  tx = graddrop(1, num_tasks=2)
  state = tx.init(params)
  low, new_state = jax.jit(tx.update)(grads, state, params)
  assert low["w"].dtype == jnp.bfloat16 and low["b"].shape == ()
  assert int(new_state.count) == 1
  full, _ = tx.update(jax.tree.map(lambda g: g.astype(jnp.float32), grads), state)
  np.testing.assert_allclose(np.asarray(low["w"], np.float32), full["w"], rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="num_tasks=3"):
    graddrop(1, num_tasks=3).update(grads, state)
  with pytest.raises(ValueError, match="structure"):
    tx.update(grads, state, {"w": params["w"]})
  with pytest.raises(ValueError, match="key"):
    graddrop(None)
  assert tree.num_tasks(grads) == 2
