r"""Exact min-norm point of a convex hull plus a cone, on the Gram matrix.

For task gradients :math:`g_1, \dots, g_T` with Gram matrix :math:`G = J J^T`,
primary tasks :math:`P` and auxiliary tasks :math:`A` (the others), find

.. math::

   \min_c \; c^T G c = \Big\lVert \sum_t c_t g_t \Big\rVert^2
   \quad \text{s.t.} \quad c_P \in \Delta^{|P|}, \; c_A \ge 0 ,

the min-norm point of :math:`\operatorname{conv}\{g_i\}_{i \in P} +
\operatorname{cone}\{g_j\}_{j \in A}`. All tasks primary is MGDA (Sener &
Koltun 2018); one primary task is Su's primary/auxiliary problem (part 3).

**Reformulation.** With :math:`h = \mathbb{1}_P` and any :math:`\rho > 0`,

.. math::

   \min_{y \ge 0} \; y^T G y + \rho (h^T y - 1)^2

has the solutions :math:`y^* = \frac{\rho}{\rho + \nu} c^*` with
:math:`\nu = c^{*T} G c^*`: for a fixed :math:`s = h^T y` the first term is
:math:`s^2` times the original objective. This is the Gram form of Lawson &
Hanson's least-distance-programming-to-NNLS reduction: only bound
constraints are left, and they are invariant to a positive rescaling of
each variable. So the solver works on :math:`M = G + \rho h h^T` scaled to
unit diagonal (a cosine matrix: gradient norms spanning many orders of
magnitude do not matter), with :math:`\rho = \min_{i \in P} G_{ii}` (an upper
bound of :math:`\nu`, so :math:`\rho / (\rho + \nu) \in [1/2, 1]`), and maps
back with :math:`c = y / h^T y`.

**Algorithm.** A primal active-set method on the scaled problem (Lawson &
Hanson's NNLS, ch. 23, in the line-search form of Nocedal & Wright, sec.
16.5): the point stays feasible and the objective decreases at every step.
While the point is not optimal on the free set, take the Newton step on the
free set, computed from the current point (so repeated steps refine it as
iterative refinement does). Once it is optimal there, free the variable with
the most negative gradient and move along the direction that keeps the
free-set gradient zero. Every step is an exact line search cut at the first
free variable that reaches zero, which leaves the free set. Moving along
that direction, instead of re-solving on the enlarged free set as plain NNLS
does, keeps float32 accurate when one variable enters as another leaves:
the enlarged set is then often nearly singular. The method terminates in
finitely many steps, typically about as many as the optimum has non-zero
weights (one ``[T, T]`` eigendecomposition each). Free-set systems are
solved by a symmetric pseudo-inverse (numpy's cut-off), so singular and
rank-deficient Grams (duplicated or zero gradients) give finite steps.

**Accuracy.** In float32 the objective is optimal up to what the rounded
Gram can resolve, about :math:`\epsilon (\sum_t |c_t| \lVert g_t \rVert)^2`
(:math:`= \epsilon \lVert d \rVert^2` without cancellation), and in float64
to float64 precision; ``tests/test_min_norm.py`` checks this against float64
oracles on random, rank-deficient, duplicated, zero, opposite and badly
scaled (``1e-10`` to ``1e10``) gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtgrad._src.solvers.info import SolverInfo
from mtgrad._src.solvers.info import default_max_iters


def default_tol(dtype) -> float:
  """KKT tolerance used when ``tol`` is ``None``: 30 machine epsilons of the
  solver dtype (about ``3.6e-6`` in float32)."""
  return 30 * float(jnp.finfo(dtype).eps)


class _Carry(NamedTuple):
  z: jax.Array  # [T] scaled variables, >= 0
  free: jax.Array  # [T] bool, the free (passive) set; z > 0 exactly there
  blocked: jax.Array  # [T] bool, may not enter until the point moves
  iterations: jax.Array  # [] int32
  done: jax.Array  # [] bool


def _pinv(matrix: jax.Array):
  """``r -> matrix^+ r`` for a symmetric matrix (numpy's pinv cut-off), so a
  singular free set (duplicated gradients) gives finite steps."""
  eigvals, eigvecs = jnp.linalg.eigh(matrix)
  cutoff = jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(eigvals))
  inv_eigvals = jnp.where(eigvals > cutoff, 1 / jnp.where(eigvals > cutoff, eigvals, 1), 0)
  return lambda r: eigvecs @ (inv_eigvals * (eigvecs.T @ r))


def _scaled_problem(gram, h):
  """The unit-diagonal problem ``(M~, b~, 1 / sqrt(diag M))`` (module docstring)."""
  sq = jnp.maximum(jnp.diagonal(gram), 0)  # [T]
  positive_primary = (h > 0) & (sq > 0)
  rho = jnp.min(jnp.where(positive_primary, sq, jnp.inf))
  rho = jnp.where(jnp.isfinite(rho), rho, 1)  # no positive primary row: any rho works
  diag = sq + rho * h  # diag(G + rho h h^T)
  inv_scale = jnp.where(diag > 0, lax.rsqrt(jnp.where(diag > 0, diag, 1)), 0)  # [T]
  # G_ij / sqrt(M_ii M_jj) without forming G_ii G_jj (which overflows float32
  # for norms above 1e10): |G_ij| inv_i <= sqrt(G_jj) by Cauchy-Schwarz.
  cosine = (inv_scale[:, None] * gram) * inv_scale[None, :]
  b = jnp.sqrt(rho) * h * inv_scale  # [T], in [0, 1]
  scaled = cosine + b[:, None] * b[None, :]
  scaled = jnp.where(jnp.eye(h.shape[0], dtype=bool), (diag > 0).astype(gram.dtype), scaled)
  return scaled, b, inv_scale


def min_norm_weights(
  gram: jax.typing.ArrayLike,
  primary_mask: jax.typing.ArrayLike | None = None,
  *,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
) -> tuple[jax.Array, SolverInfo]:
  r"""Weights of the min-norm point of a convex hull plus a cone.

  Solves, exactly (see the module docstring for the method),

  .. math::

     c^* = \operatorname{argmin}_c \; c^T G c \quad \text{s.t.} \quad
     \sum_{i \in P} c_i = 1, \; c \ge 0 ,

  so that :math:`d = \sum_t c^*_t g_t` is the min-norm point of
  :math:`\operatorname{conv}\{g_i\}_{i \in P} + \operatorname{cone}\{g_j\}_{j
  \notin P}`. Its optimality conditions are the MGDA conditions
  :math:`\langle d, g_i \rangle \ge \lVert d \rVert^2` for :math:`i \in P`
  (equality where :math:`c_i > 0`) and :math:`\langle d, g_j \rangle \ge 0`
  for auxiliary :math:`j` (equality where :math:`c_j > 0`).

  The result does not depend on the scale of ``gram`` or of its rows: the
  solver works on a unit-diagonal (cosine) matrix. ``jit``- and
  ``vmap``-able; the loop is bounded by ``max_iters``.

  Args:
    gram: ``[T, T]`` symmetric positive semi-definite Gram matrix.
    primary_mask: ``[T]`` booleans (or 0/1), ``True`` for primary tasks
      (may be traced). ``None``: every task is primary (MGDA). With no
      primary task the weights are 0 (the cone's min-norm point).
    max_iters: iteration budget (one ``[T, T]`` eigendecomposition each);
      ``None`` for ``4 T + 20``.
    tol: tolerance of the stopping test and of ``converged``, on the KKT
      residual of the scaled problem: the largest violation (the gradient
      where a weight is positive, its negative part elsewhere) relative to
      the size of the gradient's terms, so dimensionless. ``None`` for 30
      machine epsilons of the solver dtype.

  Returns:
    ``(weights, info)``: ``[T]`` weights ``c*`` (float32, or the input dtype
    if wider) and a :class:`mtgrad.SolverInfo`. A zero row gets weight 0 as
    an auxiliary task; a zero primary row is the optimum itself (``d = 0``).
    A Gram with a NaN or infinite entry gives NaN weights, a NaN residual
    and ``converged=False``, without iterating.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.min_norm import min_norm_weights
    >>> gram = jnp.array([[4.0, -2.0], [-2.0, 4.0]])
    >>> weights, info = min_norm_weights(gram)
    >>> weights.round(4), bool(info.converged)
    (Array([0.5, 0.5], dtype=float32), True)
    >>> min_norm_weights(gram, jnp.array([True, False]))[0].round(4)
    Array([1. , 0.5], dtype=float32)

  References:
    Lawson & Hanson, *Solving Least Squares Problems*, Prentice-Hall 1974,
    ch. 23 (NNLS and least-distance programming).
    Nocedal & Wright, *Numerical Optimization*, 2nd ed., Springer 2006,
    sec. 16.5 (primal active-set methods).
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018.
    Su Jianlin, *多任务学习漫谈（三）：分主次之序*, kexue.fm/archives/8907, 2022.
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
    raise ValueError(f"mtgrad: expected a square [T, T] Gram matrix, got shape {gram.shape}.")
  num = gram.shape[0]
  dtype = jnp.result_type(gram.dtype, jnp.float32)
  gram = gram.astype(dtype)
  if primary_mask is None:
    h = jnp.ones(num, dtype)
  else:
    mask = jnp.asarray(primary_mask)
    if mask.shape != (num,):
      raise ValueError(
        f"mtgrad: primary_mask must have shape ({num},) for a [{num}, {num}] Gram, "
        f"got shape {mask.shape}."
      )
    h = (mask != 0).astype(dtype)
  max_iters = default_max_iters(num) if max_iters is None else max_iters
  tol = default_tol(dtype) if tol is None else tol

  finite = jnp.all(jnp.isfinite(gram))
  gram = jnp.where(finite, gram, 0)
  gram = 0.5 * gram + 0.5 * gram.T
  scaled, b, inv_scale = _scaled_problem(gram, h)
  usable = jnp.diagonal(scaled) > 0  # zero auxiliary rows never enter

  def gradient(z):
    return scaled @ z - b  # of 0.5 z^T M~ z - b^T z

  def magnitude(z):
    # Size of the terms of the gradient: its float rounding is eps times this.
    return 1 + jnp.max(jnp.abs(scaled) @ z)

  index = jnp.arange(num)

  def cond(carry: _Carry):
    return (carry.iterations < max_iters) & ~carry.done

  def body(carry: _Carry) -> _Carry:
    z, free, blocked = carry.z, carry.free, carry.blocked
    both = free[:, None] & free[None, :]
    pinv = _pinv(jnp.where(both, scaled, 0) + jnp.diag(jnp.where(free, 0, 1).astype(dtype)))
    grad = gradient(z)
    threshold = tol * magnitude(z)
    # Not yet optimal on the free set: Newton step on it (from z, so repeated
    # steps refine the solution). Optimal there: free the variable with the
    # most negative gradient, moving along the direction that keeps the
    # free-set gradient zero.
    refine = jnp.any(free & (jnp.abs(grad) > threshold))
    candidates = jnp.where(free | blocked | ~usable, -jnp.inf, -grad)
    enter = jnp.argmax(candidates)
    add = ~refine & (candidates[enter] > threshold)
    entering = add & (index == enter)
    rhs = jnp.where(free, -jnp.where(refine, grad, scaled[:, enter]), 0)
    direction = jnp.where(free, pinv(rhs), 0) + entering.astype(dtype)
    # Exact line search, cut at the first free variable that reaches 0.
    slope = grad @ direction
    curvature = direction @ (scaled @ direction)
    exact = jnp.where(curvature > 0, -slope / jnp.where(curvature > 0, curvature, 1), jnp.inf)
    shrinking = free & (direction < 0)
    ratios = jnp.where(shrinking, z / jnp.where(shrinking, -direction, 1), jnp.inf)
    leave = jnp.argmin(ratios)
    step = jnp.minimum(exact, ratios[leave])
    moves = (refine | add) & (slope < 0) & jnp.isfinite(step)
    z_next = jnp.maximum(z + step * direction, 0)
    z_next = jnp.where((ratios[leave] <= exact) & (index == leave), 0, z_next)
    z_next = jnp.where(moves, z_next, z)
    # No descent along the direction: only rounding does that (an entering
    # gradient at noise level, a numerically singular free set). Block an
    # entering variable until the point moves; stop if the free set is stuck.
    return _Carry(
      z=z_next,
      free=jnp.where(moves, (free | entering) & (z_next > 0), free),
      blocked=jnp.where(moves, False, blocked | (entering & ~moves)),
      iterations=carry.iterations + 1,
      done=~(refine | add) | (refine & ~moves),
    )

  none = jnp.zeros(num, bool)
  initial = _Carry(
    z=jnp.zeros(num, dtype),
    free=none,
    blocked=none,
    iterations=jnp.zeros([], jnp.int32),
    done=~finite,
  )
  final = lax.while_loop(cond, body, initial)
  z, iterations = final.z, final.iterations

  grad = gradient(z)
  violation = jnp.where(z > 0, jnp.abs(grad), jnp.maximum(-grad, 0))
  residual = jnp.max(jnp.where(usable, violation, 0)) / magnitude(z)
  y = z * inv_scale
  total = jnp.sum(h * y)
  weights = jnp.where(total > 0, y / jnp.where(total > 0, total, 1), 0)  # no primary: c = 0
  weights = jnp.where(finite, weights, jnp.nan)
  residual = jnp.where(finite, residual, jnp.nan)
  info = SolverInfo(
    iterations=iterations.astype(jnp.int32),
    residual=residual.astype(jnp.float32),
    converged=finite & (residual <= tol),
  )
  return weights, info
