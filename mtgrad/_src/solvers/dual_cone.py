r"""Projection onto the dual cone of the task gradients, on the Gram matrix.

For task gradients :math:`g_1, \dots, g_T` (rows of :math:`J`, Gram matrix
:math:`G = J J^T`) and a vector :math:`u \in \mathbb{R}^T`, the projection of
:math:`J^T u` onto the dual cone :math:`\{x : J x \ge 0\}` is :math:`J^T v`
with

.. math::

   v = \operatorname{argmin}_v \; v^T G v \quad \text{s.t.} \quad v \ge u

(Quinton & Rey 2024, Proposition 1). Its optimality conditions are

.. math::

   v \ge u, \qquad G v \ge 0, \qquad (v - u) \odot G v = 0 ,

so :math:`d = J^T v` satisfies :math:`\langle d, g_t \rangle = (G v)_t \ge 0`
for every task: the projection conflicts with no task. ``d`` is unique;
``v`` is unique when ``G`` is non-singular.

**Scaling.** With :math:`s_t = \sqrt{G_{tt}}` (the gradient norms) and
:math:`z = s \odot v`, the problem reads
:math:`\min_z z^T K z` s.t. :math:`z \ge s \odot u` with the cosine matrix
:math:`K = \operatorname{diag}(s)^{-1} G \operatorname{diag}(s)^{-1}` (unit
diagonal): a positive diagonal change of variables keeps the bounds
elementwise. The solver works on ``K``, whose entries are all of order one
whatever the gradient scales (norms spanning twenty orders of magnitude are
handled); only the bound vector carries the scales. Rows with
:math:`G_{tt} = 0` (zero gradients) do not enter the objective; their
variable is set to :math:`\max(u_t, 0)`.

**Algorithm.** A primal active-set method (Lawson & Hanson's NNLS, 1974,
ch. 23, for the bound-constrained quadratic in :math:`y = z - s \odot u \ge
0`), one symmetric eigendecomposition per iteration: start at the bound
:math:`z = s \odot u` (feasible), free the variable with the most negative
gradient :math:`(K z)_t`, move to the minimiser on the free set that is
closest to the current point (a pseudo-inverse Newton step, so singular
free sets — duplicated or dependent gradients — give finite answers; up to
three more such steps refine an ill-conditioned free set), stepping back to
the first bound it crosses and fixing that variable. It
terminates at the exact optimum (up to the linear solves) in finitely many
steps, typically about as many as the optimum has variables above their
bound. NaN or infinite inputs give NaN without iterating.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mtgrad._src.solvers.info import SolverInfo
from mtgrad._src.solvers.info import default_max_iters


def default_tol(dtype) -> float:
  """KKT tolerance used when ``tol`` is ``None``: ``20`` machine epsilons
  of the solver dtype (about ``2.4e-6`` in float32)."""
  return 20 * float(jnp.finfo(dtype).eps)


def solver_dtype(dtype) -> jnp.dtype:
  """float32, or the input dtype if it is a wider float."""
  return jnp.result_type(dtype, jnp.float32)


def regularized_gram(
  gram: jax.typing.ArrayLike,
  norm_eps: float | jax.Array = 0.0,
  reg_eps: float | jax.Array = 0.0,
) -> jax.Array:
  r"""torchjd's normalised and regularised Gram, up to a positive factor.

  torchjd (``normalize`` then ``regularize``) solves its projections with
  :math:`\tilde G = G / \operatorname{tr} G + \epsilon_{reg} I`, and with
  :math:`\tilde G = \epsilon_{reg} I` when :math:`\operatorname{tr} G <
  \epsilon_{norm}` (an absolute threshold). The projection's ``v`` does not
  change when the Gram is multiplied by a positive number, so this returns
  :math:`G + \epsilon_{reg} \operatorname{tr}(G) I` (no division, no
  underflow of tiny Grams), and the identity below the threshold (the same
  ``v``: :math:`\max(u, 0)`).

  Args:
    gram: ``[T, T]`` Gram matrix.
    norm_eps: trace threshold (absolute, as torchjd's ``norm_eps``).
    reg_eps: relative regularisation (torchjd's ``reg_eps``, relative to the
      trace).

  Returns:
    ``[T, T]`` symmetric matrix in the solver dtype (NaN stays NaN).
  """
  gram = jnp.asarray(gram)
  gram = gram.astype(solver_dtype(gram.dtype))
  gram = 0.5 * (gram + gram.T)
  trace = jnp.trace(gram)
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  regularized = gram + jnp.asarray(reg_eps, gram.dtype) * trace * eye
  return jnp.where(trace < norm_eps, eye, regularized)


_POLISH = 3  # refinement solves allowed on a settled free set


def _pinv_apply(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  # Symmetric pseudo-inverse times rhs (numpy's pinv cut-off): a singular
  # free set gives the least-norm correction, finite.
  eigvals, eigvecs = jnp.linalg.eigh(matrix)
  cutoff = jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(eigvals))
  keep = eigvals > cutoff
  inv = jnp.where(keep, 1 / jnp.where(keep, eigvals, 1), 0)
  return eigvecs @ (inv * (eigvecs.T @ rhs))


def _check_shapes(gram: jax.Array, u: jax.Array) -> int:
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
    raise ValueError(f"mtgrad: expected a square [T, T] Gram matrix, got shape {gram.shape}.")
  num = gram.shape[0]
  if u.shape != (num,):
    raise ValueError(
      f"mtgrad: expected a lower bound u of shape ({num},) for a [{num}, {num}] Gram, "
      f"got shape {u.shape}."
    )
  return num


def project_weights(
  gram: jax.typing.ArrayLike,
  u: jax.typing.ArrayLike,
  *,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
) -> tuple[jax.Array, SolverInfo]:
  r"""Weights of the projection of :math:`J^T u` onto the dual cone of the rows of ``J``.

  Solves, exactly (see the module docstring),

  .. math::

     v = \operatorname{argmin}_v \; v^T G v \quad \text{s.t.} \quad v \ge u ,

  for a symmetric positive semi-definite ``G``; :math:`J^T v` is the
  projection and :math:`\langle J^T v, g_t \rangle = (G v)_t \ge 0`.
  Multiplying ``G`` by a positive number leaves ``v`` unchanged; the solver
  works on the cosine matrix, so the accuracy does not depend on the
  gradient norms. ``jit``- and ``vmap``-able; the loop is bounded by
  ``max_iters``.

  Args:
    gram: ``[T, T]`` symmetric positive semi-definite matrix.
    u: ``[T]`` lower bounds.
    max_iters: iteration budget (one ``[T, T]`` eigendecomposition each);
      ``None`` for ``4 T + 20``.
    tol: tolerance on the KKT residual, relative to the size of the terms of
      the gradient :math:`K z` (dimensionless, see :class:`mtgrad.SolverInfo`);
      ``None`` for 20 machine epsilons of the solver dtype. It is also the
      threshold for freeing a variable.

  Returns:
    ``(v, info)``: ``[T]`` weights (float32, or the input dtype if wider)
    and a :class:`mtgrad.SolverInfo`. Rows with a zero diagonal get
    :math:`\max(u_t, 0)`. NaN or infinite entries in ``gram`` or ``u`` give
    NaN weights, a NaN residual and ``converged=False``, without iterating.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.dual_cone import project_weights
    >>> gram = jnp.array([[4.0, -2.0], [-2.0, 4.0]])
    >>> v, info = project_weights(gram, jnp.array([1.0, 0.0]))
    >>> v.round(4), bool(info.converged)
    (Array([1. , 0.5], dtype=float32), True)
    >>> (gram @ v).round(4)  # no conflict: G v >= 0, = 0 where v > u
    Array([3., 0.], dtype=float32)

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024 (arXiv:2406.16232), Proposition 1.
    Lawson & Hanson, *Solving Least Squares Problems*, Prentice-Hall 1974,
    ch. 23.
  """
  gram = jnp.asarray(gram)
  u = jnp.asarray(u)
  num = _check_shapes(gram, u)
  dtype = solver_dtype(jnp.result_type(gram.dtype, u.dtype))
  gram = gram.astype(dtype)
  u = u.astype(dtype)
  max_iters = default_max_iters(num) if max_iters is None else max_iters
  tol = default_tol(dtype) if tol is None else tol

  finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(u))
  gram = jnp.where(finite, gram, 0)
  u = jnp.where(finite, u, 0)
  gram = 0.5 * (gram + gram.T)
  diag = jnp.diagonal(gram)
  usable = diag > 0  # zero rows never enter the objective
  inv_scale = jnp.where(usable, lax.rsqrt(jnp.where(usable, diag, 1)), 0)  # [T]
  scale = jnp.where(usable, jnp.sqrt(jnp.where(usable, diag, 0)), 0)  # [T]
  # K = S^-1 G S^-1, one side at a time (no overflow of G_ii G_jj).
  cosine = (inv_scale[:, None] * gram) * inv_scale[None, :]
  cosine = jnp.where(jnp.eye(num, dtype=bool), usable.astype(dtype), cosine)
  bound = scale * u  # [T], lower bound of z = S v
  index = jnp.arange(num)

  def magnitude(z):
    # Size of the terms of the gradient K z and of the bounds it was computed
    # from: its rounding is eps times this.
    return jnp.max(jnp.abs(cosine) @ jnp.maximum(jnp.abs(z), jnp.abs(bound)))

  def cond(carry):
    _, _, _, _, it, done = carry
    return (it < max_iters) & ~done

  def body(carry):
    z, free, blocked, polish, it, _ = carry
    grad = cosine @ z
    both = free[:, None] & free[None, :]
    matrix = jnp.where(both, cosine, 0) + jnp.diag(jnp.where(free, 0, 1).astype(dtype))
    # The minimiser on the free set closest to z (pseudo-inverse Newton step).
    s = jnp.where(free, z - _pinv_apply(matrix, jnp.where(free, grad, 0)), bound)
    feasible = jnp.all(jnp.where(free, s > bound, True))

    # Feasible: accept s, then free the most violated bound (if any).
    grad_s = cosine @ s
    size_s = magnitude(s)
    candidates = jnp.where(free | blocked | ~usable, -jnp.inf, -grad_s)
    enter = jnp.argmax(candidates)
    add = candidates[enter] > tol * size_s
    free_feasible = free | (add & (index == enter))
    # An ill-conditioned free set leaves a gradient on it after one solve:
    # refine (re-solve from s with the same free set) up to `_POLISH` times.
    stationary = jnp.max(jnp.where(free, jnp.abs(grad_s), 0)) <= tol * size_s
    settled = feasible & ~add
    polish_next = jnp.where(settled, polish + 1, 0)

    # Infeasible: step from z towards s up to the first bound, fix it there.
    shrinking = free & (s <= bound)
    gap = z - bound
    ratios = jnp.where(shrinking, gap / jnp.where(shrinking, z - s, 1), jnp.inf)
    leave = jnp.argmin(ratios)
    alpha = jnp.clip(ratios[leave], 0, 1)
    z_step = z + alpha * (s - z)
    z_step = jnp.where(index == leave, bound, z_step)
    free_step = free & (z_step > bound)
    z_step = jnp.where(free_step, z_step, bound)
    # A variable freed with a rounding-level gradient can come straight back
    # (alpha = 0, z unchanged): block it so the iteration cannot cycle.
    stalled = alpha <= 0
    blocked_step = blocked | (stalled & shrinking & (gap <= 0))

    return (
      jnp.where(feasible, s, z_step),
      jnp.where(feasible, free_feasible, free_step),
      jnp.where(feasible, blocked, blocked_step),
      polish_next,
      it + 1,
      settled & (stationary | (polish_next > _POLISH)),
    )

  none = jnp.zeros(num, bool)
  zero = jnp.zeros([], jnp.int32)
  z, free, _, _, iterations, _ = lax.while_loop(
    cond, body, (bound, none, none, zero, zero, ~finite)
  )

  grad = cosine @ z
  violation = jnp.where(free, jnp.abs(grad), jnp.maximum(-grad, 0))
  size = magnitude(z)
  worst = jnp.max(jnp.where(usable, violation, 0))
  residual = jnp.where(size > 0, worst / jnp.where(size > 0, size, 1), worst)
  v = jnp.where(usable, z * inv_scale, jnp.maximum(u, 0))
  v = jnp.where(finite, v, jnp.nan)
  residual = jnp.where(finite, residual, jnp.nan)
  info = SolverInfo(
    iterations=iterations.astype(jnp.int32),
    residual=residual.astype(jnp.float32),
    converged=finite & (residual <= tol),
  )
  return v, info


def merge_infos(info: SolverInfo) -> SolverInfo:
  """One report for a batch of solves: most iterations, worst residual (NaN
  if any is NaN), all converged."""
  return SolverInfo(
    iterations=jnp.max(info.iterations),
    residual=jnp.max(info.residual),
    converged=jnp.all(info.converged),
  )


def project_weights_many(
  gram: jax.typing.ArrayLike,
  us: jax.typing.ArrayLike,
  *,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
) -> tuple[jax.Array, SolverInfo]:
  """:func:`project_weights` for several lower bounds ``us`` ``[K, T]`` at once.

  The ``K`` problems share the Gram matrix and are solved in one ``vmap``.

  Returns:
    ``(vs, info)``: ``[K, T]`` weights and one :class:`mtgrad.SolverInfo`
    (the most iterations, the worst residual, whether all converged).

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.dual_cone import project_weights_many
    >>> gram = jnp.array([[4.0, -2.0], [-2.0, 4.0]])
    >>> vs, info = project_weights_many(gram, jnp.eye(2))
    >>> vs.round(4), int(info.iterations)
    (Array([[1. , 0.5],
           [0.5, 1. ]], dtype=float32), 2)
  """
  us = jnp.asarray(us)
  if us.ndim != 2:
    raise ValueError(f"mtgrad: expected lower bounds of shape [K, T], got shape {us.shape}.")
  vs, info = jax.vmap(lambda u: project_weights(gram, u, max_iters=max_iters, tol=tol), in_axes=0)(
    us
  )
  return vs, merge_infos(info)
