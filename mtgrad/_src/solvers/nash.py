r"""The alpha-fair weight system :math:`G w = w^{-1/\alpha}` on the Gram matrix.

FairGrad (Ban & Ji 2024) asks for weights :math:`w > 0` with

.. math::

   (G w)_t = w_t^{-1/\alpha} \quad \text{for every task } t ,

and Nash-MTL (Navon et al. 2022) is the case :math:`\alpha = 1`,
:math:`w \odot (G w) = 1`. The system is the stationarity condition of the
strictly convex

.. math::

   F(w) = \tfrac12 w^\top G w - \sum_t h(w_t), \qquad h'(w) = w^{-1/\alpha}

(:math:`h = \log` for :math:`\alpha = 1`), so a solution is unique when it
exists, and it exists exactly when the task gradients are not Pareto
stationary (:math:`0 \notin \operatorname{conv}\{g_t\}`): along a
non-negative :math:`v` with :math:`J^\top v = 0` the quadratic term vanishes
and :math:`F` is unbounded below (:math:`\alpha \ge 1`) or does not attain its
infimum (:math:`\alpha < 1`).

**Scale-free variables.** With :math:`n_t = \lVert g_t \rVert`, the cosine
matrix :math:`K` and :math:`\kappa = (1 - \alpha) / (1 + \alpha)`, write
:math:`w_t = y_t\, n_t^{\kappa} / n_t`. Then :math:`b_t = w_t n_t =
y_t n_t^{\kappa}` is the weight on the unit gradient :math:`u_t`, the update
is :math:`d = \sum_t b_t u_t`, and the system reads

.. math::

   r_t(y) = y_t^{1/\alpha}\, \frac{(K b)_t}{n_t^{\kappa}} - 1 = 0 ,

which is ``y = 1`` for orthogonal gradients. For :math:`\alpha = 1` it is
:math:`b \odot (K b) = 1`: no norm appears at all, so gradient norms spanning
the whole float range change nothing. For :math:`\alpha \ne 1` the ratios
:math:`(n_j / n_t)^{\kappa}` remain: the problem itself depends on the
scales (see :func:`solve_fair`).

**Newton.** In relative steps :math:`w \leftarrow w \odot (1 + t\delta)`
the Newton system of :math:`F` is :math:`(B K B + S^2/\alpha)\,\delta =
-S^2 r` with :math:`B = \operatorname{diag}(b)`, :math:`s_t = n_t^\kappa
y_t^{(1 - 1/\alpha)/2}` (so :math:`s_t^2 = w_t^{1 - 1/\alpha}`): symmetric
positive definite (for :math:`\alpha = 1`, :math:`(B K B + I)\delta = -r`,
eigenvalues at least 1). It is solved with each row divided by its
:math:`s_t^2`, i.e. each equation in its own units,

.. math::

   \big(\operatorname{diag}(y^{1/\alpha} / n^\kappa)\, K B + I/\alpha\big)\,
   \delta = -r ,

by LU: then every :math:`\delta_t` is accurate relative to its own size
even when :math:`s` spans many orders of magnitude (a Cholesky factor of the
symmetric form mixes the scales and stalls the small tasks for
:math:`\alpha \ne 1`). The step length comes from an Armijo test on
:math:`F` over 16 halvings evaluated at once (no inner loop; the change of
:math:`F` is formed from differences, so float32 resolves it), capped so
that the weights stay positive; once no weight moves by more than 1% the
full step is taken (quadratic convergence). The loop stops after the step
in which no weight moved by more than :math:`\sqrt{\epsilon}` (the next
correction is then at the float resolution), or at the iteration budget.
Cold starts use :math:`y = 1`, warm starts the previous weights; either is
first rescaled to the minimum of :math:`F` along its ray. Random,
conflicting and badly scaled instances with up to 40 tasks take at most 10
steps from a cold start at :math:`\alpha = 1`, one from the solution.

**Residual.** The reported residual is the largest relative Newton
correction :math:`\max_t |\delta_t|` of the exact (unregularised) system at
the returned weights: a first-order estimate of the weights' largest
relative error, within a small factor of the true one on the test
instances. It is close to :math:`\lVert w \odot G w - 1 \rVert_\infty`
for ``alpha = 1``; for :math:`\alpha \ne 1` with very different norms the
plain residual :math:`w_t^{1/\alpha} (G w)_t - 1` of a small task is
dominated by rounding in the large tasks' terms and says nothing about the
weights, so it is not used. It is capped at 1.

**Ridge.** The solver works on :math:`K + \epsilon I` (:math:`\epsilon` the
machine epsilon of the solver dtype, the rounding level of :math:`K`'s unit
diagonal). It leaves solvable systems unchanged to rounding (relative change
of order :math:`\epsilon b_t^2`) and makes the Pareto-stationary ones
bounded: there the iterates would diverge along the null combination; with
the ridge they stop at :math:`b \sim \epsilon^{-1/2}` on the tasks that
cancel, whose combination is then nearly zero, and the residual of the
unregularised system (of order 1) reports the failure.

Zero gradients are removed from the system (weight 0): no positive weight
can satisfy their equation :math:`0 = w_t^{-1/\alpha}`, so they count as a
residual of 1 and the solve reports ``converged=False``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtgrad._src.solvers.cosine import norms_and_cosines
from mtgrad._src.solvers.info import SolverInfo

# Candidate step lengths of the vectorised backtracking line search.
_NUM_STEPS = 16
# Largest relative change of a weight below which the full step is taken.
_FULL_STEP = 1e-2
# Armijo sufficient-decrease constant.
_ARMIJO = 1e-4
# Fraction of the distance to the boundary w = 0 a step may cover.
_TO_BOUNDARY = 0.99
# Lower clamp of exp() arguments (float32 exp underflows below -87).
_MIN_EXPONENT = -80.0


def default_max_iters(num_tasks: int) -> int:
  """Iteration budget used when ``max_iters`` is ``None``: 50 Newton steps.

  Cold starts at ``alpha = 1`` take at most about 10, at ``alpha != 1`` with
  norms spread over many orders of magnitude up to about 30; warm starts a
  few. The budget is exhausted only where the float precision stalls the
  correction (degenerate or unresolvable systems), which is reported.
  """
  del num_tasks
  return 50


def default_tol(dtype) -> float:
  r"""Tolerance on the residual (the weights' estimated relative error) when
  ``tol`` is ``None``: ``10^4`` machine epsilons of the solver dtype, about
  ``1.2e-3`` in float32 (the reference stops its solver at
  :math:`\lVert G \alpha - 1/\alpha \rVert < 10^{-3}`). Well-conditioned
  float32 solves reach ``1e-6``; nearly opposite gradients, whose weights
  float32 resolves only to about ``1e-4``, still pass."""
  return 1e4 * float(jnp.finfo(dtype).eps)


class ScaleFree(NamedTuple):
  """The Gram matrix split into angles and log-norms.

  Attributes:
    cosine: ``[T, T]`` cosine matrix; a zero gradient has a zero row and
      column and a unit diagonal entry (so its equation decouples).
    log_norms: ``[T]`` ``log ||g_t||`` (0 for zero gradients).
    norms: ``[T]`` ``||g_t||``.
    live: ``[T]`` bool, the gradient is non-zero.
  """

  cosine: jax.Array
  log_norms: jax.Array
  norms: jax.Array
  live: jax.Array


def scale_free(gram: jax.Array) -> ScaleFree:
  """Cosines and norms of a (finite) Gram matrix, without squaring a norm."""
  num = gram.shape[-1]
  norms, cosine = norms_and_cosines(gram)
  live = norms > 0
  cosine = jnp.where(jnp.eye(num, dtype=bool), 1, cosine)  # a zero task decouples
  return ScaleFree(cosine, jnp.log(jnp.where(live, norms, 1)), norms, live)


class _Problem(NamedTuple):
  cosine: jax.Array  # [T, T] K + ridge I
  rho: jax.Array  # [T] n^kappa / max n^kappa, in (0, 1]
  inv_alpha: jax.Array  # []
  q: jax.Array  # [] 1 - 1/alpha


class _Point(NamedTuple):
  b: jax.Array  # [T] weights on the unit gradients (relative units)
  kb: jax.Array  # [T] (K + ridge I) b
  r: jax.Array  # [T] residual of the (ridged) system
  s: jax.Array  # [T] n^kappa y^(q/2) (relative units), s^2 = w^(1 - 1/alpha)


def _evaluate(p: _Problem, y: jax.Array) -> _Point:
  b = p.rho * y
  kb = p.cosine @ b
  log_y = jnp.log(y)
  r = jnp.exp(p.inv_alpha * log_y) * kb / p.rho - 1
  s = p.rho * jnp.exp(0.5 * p.q * log_y)
  return _Point(b, kb, r, s)


def _newton(p: _Problem, pt: _Point, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(delta, lambda^2)``: relative Newton step and squared decrement.

  The Newton system of ``F`` in relative steps, ``(B K B + S^2 / alpha)
  delta = -S^2 r``, is solved with each row divided by its ``s_t^2``:
  ``(diag(y^(1/alpha) / rho) K B + I / alpha) delta = -r``. Row ``t`` is
  then equation ``t`` in its own units, so every ``delta_t`` is accurate
  relative to its own size even when the norms (and so ``s``) span many
  orders of magnitude.
  """
  num = pt.b.shape[0]
  row = jnp.exp(p.inv_alpha * jnp.log(y)) / p.rho  # y^(1/alpha) / rho = b / s^2
  matrix = row[:, None] * p.cosine * pt.b[None, :] + p.inv_alpha * jnp.eye(num, dtype=pt.b.dtype)
  delta = jnp.linalg.solve(matrix, -pt.r)
  decrement = jnp.maximum(-((pt.s * pt.s * pt.r) @ delta), 0)  # delta^T (BKB + S^2/alpha) delta
  return delta, decrement


def _line_search(p: _Problem, pt: _Point, delta, decrement):
  """Largest ``t`` among ``t_max 2^-j`` with Armijo decrease of ``F``."""
  dtype = pt.b.dtype
  push = jnp.max(-delta)
  t_max = jnp.where(push > 0, jnp.minimum(1, _TO_BOUNDARY / jnp.where(push > 0, push, 1)), 1)
  steps = t_max * (0.5 ** jnp.arange(_NUM_STEPS, dtype=dtype))  # [S]
  # F(t) - F(0), from differences: quadratic part and the h part.
  bd = pt.b * delta
  quadratic = 2 * steps * (bd @ pt.kb) + steps**2 * (bd @ (p.cosine @ bd))
  log_ratio = jnp.log1p(steps[:, None] * delta[None, :])  # [S, T]
  q_safe = jnp.where(p.q == 0, 1, p.q)
  h_rel = jnp.where(p.q == 0, log_ratio, jnp.expm1(p.q * log_ratio) / q_safe)
  change = 0.5 * quadratic - h_rel @ (pt.s * pt.s)
  ok = change <= -_ARMIJO * steps * decrement
  ok = ok | (jnp.max(jnp.abs(delta)) <= _FULL_STEP)
  index = jnp.where(jnp.any(ok), jnp.argmax(ok), _NUM_STEPS - 1)
  return steps[index]


def _usable(delta, decrement):
  # A step the float precision cannot resolve (the Newton matrix rounds to
  # singular when weights blow up at a Pareto-stationary point) ends the loop.
  return jnp.all(jnp.isfinite(delta)) & jnp.isfinite(decrement)


class _Carry(NamedTuple):
  y: jax.Array
  point: _Point
  delta: jax.Array
  decrement: jax.Array
  iterations: jax.Array
  done: jax.Array


def _solve(p: _Problem, y0, max_iters, stop_step):
  def body(c: _Carry) -> _Carry:
    t = _line_search(p, c.point, c.delta, c.decrement)
    y = c.y * (1 + t * c.delta)
    point = _evaluate(p, y)
    delta, decrement = _newton(p, point, y)
    return _Carry(
      y,
      point,
      delta,
      decrement,
      c.iterations + 1,
      (jnp.max(jnp.abs(c.delta)) <= stop_step) | ~_usable(delta, decrement),
    )

  def cond(c: _Carry):
    return (c.iterations < max_iters) & ~c.done

  point = _evaluate(p, y0)
  delta, decrement = _newton(p, point, y0)
  init = _Carry(y0, point, delta, decrement, jnp.zeros([], jnp.int32), ~_usable(delta, decrement))
  return lax.while_loop(cond, body, init)


def _ray_scale(p: _Problem, y: jax.Array) -> jax.Array:
  """Rescales ``y`` to the minimum of ``F`` along its ray ``c y``."""
  pt = _evaluate(p, y)
  energy = pt.b @ pt.kb  # > 0 thanks to the ridge
  mass = jnp.sum(pt.s * pt.s)
  alpha = 1 / p.inv_alpha
  log_c = alpha / (1 + alpha) * (jnp.log(mass) - jnp.log(energy))
  return y * jnp.exp(jnp.clip(log_c, _MIN_EXPONENT, -_MIN_EXPONENT))


def solve_fair(
  gram: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike = 1.0,
  init: jax.typing.ArrayLike | None = None,
  *,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
) -> tuple[jax.Array, SolverInfo]:
  r"""Solves :math:`G w = w^{-1/\alpha}`, :math:`w > 0` (Nash-MTL for ``alpha = 1``).

  See the module docstring for the method. ``jit``- and ``vmap``-able;
  ``alpha``, ``max_iters`` and ``tol`` may be traced.

  Args:
    gram: ``[T, T]`` symmetric positive semi-definite Gram matrix.
    alpha: the fairness parameter, ``alpha > 0`` (1: Nash-MTL).
    init: ``[T]`` warm start, weights in the units of ``w`` (the previous
      solution); entries that are not positive and finite (zeros before the
      first step, removed tasks) start cold. ``None``: cold start.
    max_iters: Newton-step budget; ``None`` for :func:`default_max_iters`.
    tol: tolerance on the reported residual; ``None`` for
      :func:`default_tol` (about ``1.2e-3`` in float32).

  Returns:
    ``(w, info)``. ``w``: ``[T]`` weights (float32, or the input dtype if
    wider), 0 for zero gradients. ``info``: a :class:`mtgrad.SolverInfo`
    whose ``residual`` is the largest relative Newton correction of the
    unregularised system at ``w`` (an estimate of the weights' largest
    relative error, capped at 1; about :math:`\lVert w \odot G w - 1
    \rVert_\infty` for ``alpha = 1``; a zero gradient contributes 1), and
    ``converged`` is ``residual <= tol``. A Gram with a NaN or infinite
    entry (or a traced ``alpha <= 0``) gives NaN weights and residual and
    ``converged=False``, without iterating.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.nash import solve_fair
    >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    >>> w, info = solve_fair(gram)  # w_t = 1 / ||g_t|| for orthogonal tasks
    >>> w.round(4), bool(info.converged)
    (Array([1. , 0.5], dtype=float32), True)
    >>> w, info = solve_fair(jnp.array([[0.0, 0.0], [0.0, 1.0]]))  # no solution
    >>> w.round(4), float(info.residual), bool(info.converged)
    (Array([0., 1.], dtype=float32), 1.0, False)

  Warning:
    For ``alpha != 1`` the system depends on the gradient norms through
    :math:`(n_j / n_t)^{\kappa}`: with norms many orders of magnitude apart
    the small tasks' equations are dominated by the large ones, and the
    float32 residual is limited accordingly (it is reported, not hidden).
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
    raise ValueError(f"mtgrad: expected a square [T, T] Gram matrix, got shape {gram.shape}.")
  num = gram.shape[0]
  dtype = jnp.result_type(gram.dtype, jnp.float32)
  if init is not None:
    init = jnp.asarray(init, dtype)
    if init.shape != (num,):
      raise ValueError(f"mtgrad: expected a warm start of shape ({num},), got {init.shape}.")
  max_iters = default_max_iters(num) if max_iters is None else max_iters
  tol = default_tol(dtype) if tol is None else tol
  # One compiled solver per shape and dtype, also when called eagerly.
  return _solve_fair_jit(
    gram.astype(dtype),
    jnp.asarray(alpha, dtype),
    init,
    jnp.asarray(max_iters, jnp.int32),
    jnp.asarray(tol, dtype),
  )


@jax.jit
def _solve_fair_jit(gram, alpha, init, max_iters, tol):
  num = gram.shape[0]
  dtype = gram.dtype
  eps = jnp.finfo(dtype).eps

  finite = jnp.all(jnp.isfinite(gram)) & jnp.isfinite(alpha) & (alpha > 0)
  sf = scale_free(jnp.where(finite, gram, jnp.eye(num, dtype=dtype)))
  kappa = (1 - alpha) / (1 + alpha)
  scaled_log = kappa * sf.log_norms
  rho = jnp.exp(jnp.maximum(scaled_log - jnp.max(scaled_log), _MIN_EXPONENT))
  inv_alpha = 1 / alpha
  ridge = jnp.asarray(eps, dtype)
  problem = _Problem(
    cosine=sf.cosine + ridge * jnp.eye(num, dtype=dtype),
    rho=rho,
    inv_alpha=inv_alpha,
    q=1 - inv_alpha,
  )

  # Warm start: y = w n / n^kappa (any common factor: the ray scaling fixes it).
  if init is None:
    y0 = jnp.ones(num, dtype)
  else:
    log_y = jnp.log(jnp.where(init > 0, init, 1)) + (1 - kappa) * sf.log_norms
    log_y = log_y - jnp.max(jnp.where(sf.live, log_y, -jnp.inf), initial=0.0)
    usable = (init > 0) & jnp.isfinite(init) & sf.live & jnp.isfinite(log_y)
    y0 = jnp.where(usable, jnp.exp(jnp.maximum(log_y, _MIN_EXPONENT)), 1)
    y0 = jnp.where(jnp.any(usable), y0, 1)
  y0 = _ray_scale(problem, y0)

  stop = jnp.sqrt(eps)
  final = _solve(problem, y0, max_iters, stop)
  y = final.y

  # Residual: the relative Newton correction of the unregularised system at
  # the returned weights (first-order estimate of their relative error); a
  # removed task counts 1.
  exact = problem._replace(cosine=sf.cosine)
  exact_point = _evaluate(exact, y)
  correction, _ = _newton(exact, exact_point, y)
  resolved = sf.live & jnp.isfinite(correction)
  residual = jnp.minimum(jnp.max(jnp.where(resolved, jnp.abs(correction), 1)), 1)
  residual = jnp.where(finite, residual, jnp.nan)

  # w = y n^kappa / n (exactly y / n for alpha = 1).
  scale = jnp.exp(kappa * sf.log_norms) / jnp.where(sf.live, sf.norms, 1)
  weights = jnp.where(sf.live, y * scale, 0)
  weights = jnp.where(finite, weights, jnp.nan)
  info = SolverInfo(
    iterations=jnp.where(finite, final.iterations, 0).astype(jnp.int32),
    residual=residual.astype(jnp.float32),
    converged=residual <= tol,
  )
  return weights, info


def combination_norm(gram: jax.typing.ArrayLike, weights: jax.typing.ArrayLike) -> jax.Array:
  r""":math:`\lVert \sum_t w_t g_t \rVert = \sqrt{w^\top G w}`, scale-free.

  Computed as :math:`\sqrt{b^\top K b}` with :math:`b_t = w_t \lVert g_t
  \rVert`, so huge and tiny gradients neither overflow nor underflow.
  """
  gram = jnp.asarray(gram)
  dtype = jnp.result_type(gram.dtype, jnp.float32)
  sf = scale_free(gram.astype(dtype))
  b = jnp.asarray(weights, dtype) * sf.norms
  cosine = jnp.where(sf.live[:, None] & sf.live[None, :], sf.cosine, 0)
  big = jnp.max(jnp.abs(b))
  unit = b / jnp.where(big > 0, big, 1)
  return big * jnp.sqrt(jnp.maximum(unit @ (cosine @ unit), 0))


def clip_factor(
  gram: jax.typing.ArrayLike,
  weights: jax.typing.ArrayLike,
  max_norm: jax.typing.ArrayLike,
) -> jax.Array:
  r""":math:`\min(1, \text{max\_norm} / \lVert \sum_t w_t g_t \rVert)`.

  The factor that rescales the weights so the update's norm is at most
  ``max_norm``; 1 when ``max_norm <= 0`` (no clipping) or the update is
  zero. NaN weights give a NaN factor.
  """
  norm = combination_norm(gram, weights)
  max_norm = jnp.asarray(max_norm, norm.dtype)
  clip = (max_norm > 0) & (norm > max_norm)
  return jnp.where(
    clip, max_norm / jnp.where(clip, norm, 1), jnp.where(jnp.isnan(norm), jnp.nan, 1)
  )
