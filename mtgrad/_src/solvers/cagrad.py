r"""The CAGrad dual problem on the Gram matrix.

.. math::

   \min_{w \in \Delta} F(w) = w^\top G \tfrac{1}{T}\mathbf{1}
     + \kappa \sqrt{w^\top G w}, \qquad
   \kappa = c \lVert g_0 \rVert = \tfrac{c}{T} \sqrt{\mathbf{1}^\top G \mathbf{1}} .

``F`` is convex (a linear term plus the norm ``||J^T w||``) and its gradient
is the vector of projections of the task gradients on the CAGrad direction:
:math:`\nabla F(w)_t = \langle g_t, d(w) \rangle` with
:math:`d(w) = g_0 + \kappa\, g_w / \lVert g_w \rVert`.

The solver works on the cosine matrix ``K`` and the norms relative to the
largest (:func:`scale_free`), never on squared norms, so gradients whose
norms differ by many orders of magnitude neither underflow nor lose their
angles. It is accelerated projected gradient (FISTA) with backtracking and
gradient-based adaptive restarts, in the diagonal metric
:math:`P = \operatorname{diag}(G)`: in the scale-free variables
:math:`a_t = w_t \lVert g_t \rVert` the curvature of ``F`` is that of the
cosine matrix, so all tasks converge at the same rate (in the Euclidean
metric the weights of small tasks would barely move). The projection onto
the simplex in that metric is exact and written in a pairwise form that
needs no difference of large numbers (:func:`project_simplex_scaled`).

No test compares objective values: near the optimum float32 cannot resolve
differences of ``F``, which stalls function-value line searches and
restarts. The backtracking test uses gradients instead (for convex ``F``,
:math:`\langle \nabla F(z) - \nabla F(y), z - y \rangle \le \tfrac{L}{2}
\lVert z - y \rVert_P^2` implies the descent lemma). The stopping test is
the larger of the gradient mapping in the scale-free variables, relative to
:math:`\lVert g_0 \rVert + \kappa`, and the relative change of
:math:`g_w` over one step.

The first-order solver identifies the support of :math:`w^\star`; the final
weights then come from the exact optimality conditions on that support
(:func:`_polish`: one ``T x T`` linear solve and a quadratic), checked for
feasibility and optimality, with the solver's ``w`` as the fallback.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtgrad._src.base import safe_reciprocal
from mtgrad._src.solvers.cosine import norms_and_cosines
from mtgrad._src.solvers.info import SolverInfo

# Floor of the metric diagonal relative to the largest squared norm: keeps the
# projection finite for zero (or underflowing) task gradients.
_METRIC_FLOOR = 1e-30
_MAX_BACKTRACKS = 40


def _project_breakpoints(beta: jax.Array, q: jax.Array) -> jax.Array:
  """``argmin_{w in simplex} sum_t (w_t - q_t beta_t)^2 / q_t``, pairwise form.

  The solution is ``w_t = max(q_t (beta_t - tau), 0)``. Written as
  ``w_t = q_t / Q (1 + sum_{s in S} q_s (beta_t - beta_s))`` (``S`` the active
  set, ``Q = sum_S q``) it needs no difference of large numbers: a task whose
  ``q_t`` is huge (a tiny gradient, cheap to move in the metric) gets its
  weight to full precision, e.g. exactly 1 when it is alone in ``S``.
  """
  order = jnp.argsort(-beta)
  bs, qs = beta[order], q[order]
  # h_k = 1 - sum_{j < k} q_j (beta_j - beta_k) > 0 iff the k-th is active.
  earlier = jnp.tril(jnp.ones((bs.shape[0], bs.shape[0]), bool), -1)  # [k, j]: j < k
  h = 1 - jnp.sum(jnp.where(earlier, qs[None, :] * (bs[None, :] - bs[:, None]), 0), axis=1)
  active_sorted = (h > 0) | (jnp.arange(bs.shape[0]) == 0)
  active = jnp.zeros_like(active_sorted).at[order].set(active_sorted)
  total = jnp.sum(jnp.where(active, q, 0))
  pull = jnp.sum(
    jnp.where(active[None, :], q[None, :] * (beta[:, None] - beta[None, :]), 0), axis=1
  )
  return jnp.maximum((q / total) * (1 + pull), 0)


def project_simplex_scaled(v: jax.Array, p: jax.Array) -> jax.Array:
  r"""Exact projection onto the simplex in the metric ``diag(p)``.

  .. math::

     \operatorname*{argmin}_{w \ge 0,\ \sum_t w_t = 1}
       \sum_t p_t (w_t - v_t)^2
     \;=\; \max(v - \tau / p, 0)

  with the threshold ``tau`` found from the breakpoints ``v_t p_t`` sorted in
  decreasing order: the active set is a prefix of that order (the
  constraint residual is monotone in ``tau``), as in the Euclidean case,
  which ``p = 1`` recovers. The weights are computed in a pairwise form
  (``O(T^2)``, no loop) that stays exact when ``p`` spans many orders of
  magnitude.

  Args:
    v: ``[T]`` point to project.
    p: ``[T]`` positive metric weights.

  Returns:
    ``[T]`` projection, dtype of ``v``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.cagrad import project_simplex_scaled
    >>> project_simplex_scaled(jnp.array([1.0, 1.0]), jnp.array([1.0, 3.0])).round(4)
    Array([0.25, 0.75], dtype=float32)
  """
  return _project_breakpoints(v * p, 1 / p)


def scale_free(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(K, n, m)``: cosine matrix, norms and mean-gradient norm, relative.

  ``G = n_max^2 diag(n) K diag(n)`` and ``m = ||g0|| / n_max``. Nothing
  squares a norm, so task gradients whose norms differ by up to the whole
  float range keep their cosines exact (the normalised Gram
  ``G / max diag G`` would underflow below ``1e-38``). Zero tasks get
  ``n_t = 0`` and a zero row and column in ``K``. ``m`` comes from the sum of
  the Gram's entries (exactly 0 for exactly opposite gradients).
  """
  num = gram.shape[0]
  norms, cosine = norms_and_cosines(gram)
  top_inv = safe_reciprocal(jnp.max(norms))
  mean_norm = jnp.sqrt(jnp.maximum(jnp.sum((gram * top_inv) * top_inv), 0)) / num
  return cosine, norms * top_inv, mean_norm


def combination_norm(cosine: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(||sum_t a_t u_t||, K a / ||sum_t a_t u_t||)`` without underflow."""
  big = jnp.max(jnp.abs(a))
  unit = a * safe_reciprocal(big)
  ka = cosine @ unit
  root = jnp.sqrt(jnp.maximum(unit @ ka, 0))
  return big * root, ka * safe_reciprocal(root)


class _State(NamedTuple):
  x: jax.Array  # [T] current iterate
  y: jax.Array  # [T] extrapolated point
  momentum: jax.Array  # [] FISTA t_k
  lipschitz: jax.Array  # [] curvature estimate in the metric
  iterations: jax.Array  # [] int32
  residual: jax.Array  # [] relative gradient-mapping norm at x


def solve_cagrad(
  cosine: jax.Array,
  norms: jax.Array,
  g0_norm: jax.Array,
  c: jax.typing.ArrayLike,
  *,
  max_iters: int | jax.Array = 500,
  tol: float | jax.Array = 1e-6,
) -> tuple[jax.Array, SolverInfo]:
  r"""Solves the CAGrad dual problem given ``(K, n, ||g0||) = scale_free(G)``.

  Args:
    cosine: ``[T, T]`` cosine matrix ``K`` of the task gradients.
    norms: ``[T]`` task-gradient norms relative to the largest.
    g0_norm: ``[]`` norm of the mean gradient relative to the largest norm.
    c: the CAGrad radius coefficient (``c >= 0``; may be traced).
    max_iters: iteration budget (may be traced).
    tol: tolerance on the relative residual (may be traced).

  Returns:
    ``(w, info)``: the simplex weights ``[T]`` minimising ``F`` and a
    :class:`mtgrad.SolverInfo`. A NaN input gives a NaN residual and
    ``converged = False``, without iterating.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.cagrad import scale_free, solve_cagrad
    >>> w, info = solve_cagrad(*scale_free(jnp.array([[1.0, -0.5], [-0.5, 4.0]])), 0.5)
    >>> bool(info.converged), w.round(4)
    (True, Array([1., 0.], dtype=float32))
  """
  dtype = cosine.dtype
  num = cosine.shape[-1]
  # w-space gradient: grad_t = n_t <u_t, d(w)>, with
  # <u_t, d> = (K n)_t / T + kappa (K a)_t / ||sum_s a_s u_s||, a = w * n.
  mean_proj = cosine @ norms / num  # <u_t, g0>
  kappa = jnp.asarray(c, dtype) * g0_norm
  scale = g0_norm + kappa  # bound on |<u_t, d>|
  inv_scale = safe_reciprocal(scale)
  metric = jnp.maximum(norms * norms, _METRIC_FLOOR)
  inv_metric = 1 / metric
  eps = jnp.finfo(dtype).eps
  floor = jnp.maximum(1e-3 * scale, jnp.finfo(dtype).tiny)

  def gradient(w):
    _, direction = combination_norm(cosine, w * norms)
    return norms * (mean_proj + kappa * direction)

  def prox(y, grad, lipschitz):
    # Breakpoints p (y - grad / (L p)) = p y - grad / L: never forms the huge
    # steps of tiny tasks (cheap in the metric), which would swamp their
    # position.
    return _project_breakpoints(metric * y - grad / lipschitz, inv_metric)

  def residual_at(x, lipschitz):
    # The gradient mapping measured in the scale-free variables a = sqrt(P) w
    # (dominated by the large tasks), and the relative change of g_w over
    # one step (which settles tiny tasks, cheap in the metric, to the
    # precision at which they steer the direction of g_w).
    step = x - prox(x, gradient(x), lipschitz)
    mapping = lipschitz * jnp.sqrt(jnp.sum(metric * step * step)) * inv_scale
    moved, _ = combination_norm(cosine, step * norms)
    current, _ = combination_norm(cosine, x * norms)
    drift = jnp.where(current > 0, moved / jnp.where(current > 0, current, 1), 0)
    return jnp.maximum(mapping, drift)

  def step_fn(s: _State) -> _State:
    grad_y = gradient(s.y)

    def curvature_exceeds(carry):
      lipschitz, z, count = carry
      diff = z - s.y
      lhs = (gradient(z) - grad_y) @ diff
      slack = 16 * eps * (jnp.abs(grad_y) @ jnp.abs(diff))
      too_flat = lhs > 0.5 * lipschitz * (diff @ (metric * diff)) + slack
      return too_flat & (count < _MAX_BACKTRACKS)

    def grow(carry):
      lipschitz, _, count = carry
      return 2 * lipschitz, prox(s.y, grad_y, 2 * lipschitz), count + 1

    lipschitz = jnp.maximum(0.7 * s.lipschitz, floor)
    carry = (lipschitz, prox(s.y, grad_y, lipschitz), jnp.zeros([], jnp.int32))
    lipschitz, z, _ = lax.while_loop(curvature_exceeds, grow, carry)
    momentum = 0.5 * (1 + jnp.sqrt(1 + 4 * s.momentum**2))
    # Gradient-based adaptive restart (O'Donoghue & Candes 2015).
    restart = ((s.y - z) * metric) @ (z - s.x) > 0
    y_next = jnp.where(restart, z, z + ((s.momentum - 1) / momentum) * (z - s.x))
    return _State(
      x=z,
      y=y_next,
      momentum=jnp.where(restart, jnp.ones([], dtype), momentum),
      lipschitz=lipschitz,
      iterations=s.iterations + 1,
      residual=residual_at(z, lipschitz),
    )

  def keep_going(s: _State):
    return (s.iterations < max_iters) & (s.residual > tol) & ~jnp.isnan(s.residual)

  x0 = jnp.full((num,), 1 / num, dtype)
  # Curvature of the norm term at the start: kappa / ||g0|| times at most T.
  lipschitz0 = jnp.maximum(kappa * num * safe_reciprocal(g0_norm), floor)
  initial = _State(
    x=x0,
    y=x0,
    momentum=jnp.ones([], dtype),
    lipschitz=lipschitz0,
    iterations=jnp.zeros([], jnp.int32),
    residual=residual_at(x0, lipschitz0),
  )
  final = lax.while_loop(keep_going, step_fn, initial)
  info = SolverInfo(
    iterations=final.iterations,
    residual=final.residual.astype(jnp.float32),
    converged=final.residual <= tol,
  )
  return final.x, info


def _polish(cosine, norms, w, kappa):
  """Exact KKT solution on the support of ``w``, in scale-free variables.

  On the support ``S`` the optimality conditions of ``F`` are linear in
  ``h = (kappa / ||g_w||) a`` (``a_t = w_t n_t``) up to one scalar:
  ``(K h)_S = mu r_S - beta_S`` with ``r = 1 / n`` and ``beta_t = <u_t, g0>``,
  and the two constraints ``sum_t w_t = 1``, ``||g_w|| = ||sum_t a_t u_t||``
  give ``mu`` as the larger root of a quadratic. The combination weights are
  then ``1/T + h_t / n_t``. ``r`` is rescaled to at most 1 (``mu`` absorbs the
  scale), so tasks whose norms differ by many orders of magnitude are solved
  to full precision. Returns ``(extra, ok)``; ``ok`` is False unless the
  solution is finite, positive on ``S`` and optimal off ``S``.
  """
  num = cosine.shape[-1]
  dtype = cosine.dtype
  support = (w > 0) & (norms > 0)
  both = support[:, None] & support[None, :]
  smallest = jnp.min(jnp.where(support, norms, jnp.inf))
  r = jnp.where(support, smallest * safe_reciprocal(norms), 0)  # r / max_S r, in (0, 1]
  r_all = jnp.where(norms > 0, smallest * safe_reciprocal(norms), 0)
  beta = cosine @ norms / num  # <u_t, g0>, relative to the largest norm
  beta_s = jnp.where(support, beta, 0)
  system = jnp.where(both, cosine, 0) + jnp.diag(jnp.where(support, 0, 1).astype(dtype))
  x, y = jnp.linalg.solve(system, jnp.stack([r, beta_s], axis=1)).T
  a_, b_, c_ = r @ x, r @ y, beta_s @ y
  disc = b_ * b_ - a_ * (c_ - kappa * kappa)
  root = jnp.sqrt(jnp.maximum(disc, 0))
  mu = (b_ + root) * safe_reciprocal(a_)
  h = jnp.where(support, mu * x - y, 0)
  # Off the support the conditions are inequalities: grad_t >= mu.
  lhs = beta + cosine @ h
  rhs = mu * r_all
  size = jnp.abs(beta) + jnp.abs(cosine @ jnp.abs(h)) + jnp.abs(rhs)
  slack = 1e-4 * size
  kkt_off = jnp.where(support | (norms == 0), True, lhs >= rhs - slack)
  zero_tasks_ok = jnp.where(norms == 0, mu <= 0, True)  # F(e_t) = 0 for a zero task
  ok = (
    (disc > 0)
    & (kappa > 0)
    & jnp.all(jnp.where(support, h > 0, True))
    & jnp.all(kkt_off)
    & jnp.all(zero_tasks_ok)
    & jnp.all(jnp.isfinite(h))
    & jnp.isfinite(mu)
  )
  extra = jnp.where(support, h * safe_reciprocal(norms), 0)
  return jnp.where(ok, extra, 0), ok


def cagrad_weights(
  gram: jax.Array,
  c: jax.typing.ArrayLike,
  *,
  max_iters: int | jax.Array = 500,
  tol: float | jax.Array = 1e-6,
) -> tuple[jax.Array, SolverInfo]:
  r"""CAGrad's combination weights :math:`\frac{1}{T} + \frac{c \lVert g_0\rVert}
  {\lVert g_w\rVert} w` (before any rescaling) and the solver's report.

  The solver's support is polished by the exact optimality conditions on it
  (:func:`_polish`); when they do not hold (a singular or misidentified
  support) the solver's ``w`` is used. In that fallback the ratio is 0 when
  :math:`\lVert g_w\rVert` is not resolved by the Gram's precision,
  :math:`\lVert \sum_t a_t u_t\rVert \le 4\sqrt{\epsilon} \sum_t a_t`
  (``a_t = w_t ||g_t||``): the update is then the mean. ``c = 0`` gives
  exactly ``1/T``; a NaN Gram gives NaN weights.
  """
  dtype = gram.dtype
  num = gram.shape[-1]
  cosine, norms, g0_norm = scale_free(gram)
  coef = jnp.asarray(c, dtype)
  w, info = solve_cagrad(cosine, norms, g0_norm, coef, max_iters=max_iters, tol=tol)
  kappa = coef * g0_norm
  a = w * norms
  gw_norm, _ = combination_norm(cosine, a)
  resolved = gw_norm > 4 * jnp.sqrt(jnp.finfo(dtype).eps) * jnp.sum(a)
  fallback = jnp.where(resolved, kappa * safe_reciprocal(gw_norm), 0) * w
  polished, ok = _polish(cosine, norms, w, kappa)
  extra = jnp.where(ok, polished, fallback)
  extra = jnp.where(kappa > 0, extra, 0)  # c = 0: the mean, exactly
  weights = 1 / num + extra
  return jnp.where(jnp.any(jnp.isnan(gram)), jnp.nan, weights), info
