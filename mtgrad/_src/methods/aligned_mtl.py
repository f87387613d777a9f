"""Aligned-MTL: independent component alignment (Senushkin et al. 2023)."""

from __future__ import annotations

import functools
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods.upgrad import check_pref_vector
from mtgrad._src.methods.upgrad import preference
from mtgrad._src.solvers.info import SolverInfo

Scale = Literal["min", "median", "rmse"]
_SCALES = ("min", "median", "rmse")


class AlignedMTLState(NamedTuple):
  """Weighting state of :func:`aligned_mtl` (``state.weighting_state``).

  Attributes:
    info: convergence of the last eigendecomposition (:class:`mtgrad.SolverInfo`:
      Jacobi sweeps, the largest relative off-diagonal entry left, whether it
      met the tolerance).
  """

  info: SolverInfo


def init_aligned_mtl_state(num_tasks: int | None = None) -> AlignedMTLState:
  """The state before the first update (does not depend on ``T``)."""
  del num_tasks
  return AlignedMTLState(info=SolverInfo.initial())


@functools.cache
def _round_robin(num: int) -> np.ndarray:
  """``[rounds, num]`` partner of each index (itself when it sits out).

  The circle method: every pair of indices meets exactly once in ``num - 1``
  rounds (``num`` rounds for odd ``num``), and the pairs of a round are
  disjoint, so their rotations commute and are applied at once.
  """
  m = num + num % 2
  players = list(range(m))
  rounds = []
  for _ in range(max(m - 1, 1)):
    partner = np.arange(num)
    for k in range(m // 2):
      a, b = players[k], players[m - 1 - k]
      if a < num and b < num:
        partner[a], partner[b] = b, a
    rounds.append(partner)
    players = [players[0], players[-1], *players[1:-1]]
  return np.stack(rounds).astype(np.int32)


def graded_eigh(
  matrix: jax.typing.ArrayLike,
  *,
  floor: float | jax.Array = 0.0,
  tol: float | jax.Array | None = None,
  max_sweeps: int | jax.Array = 30,
) -> tuple[jax.Array, jax.Array, SolverInfo]:
  r"""Eigendecomposition of a symmetric positive semi-definite matrix, scale-aware.

  Two-sided cyclic Jacobi (round-robin ordering, the disjoint rotations of a
  round applied at once) with Demmel & Veselić's stopping rule: it stops when
  every :math:`|A_{ij}| \le \mathrm{tol} \sqrt{A_{ii} A_{jj}}` (rotating
  the pairs above an eighth of that, for a margin over the rounding). For
  :math:`A = D K D` with ``D`` diagonal (the task gradient norms) the
  eigenvalues then come out with *relative* accuracy
  about :math:`\epsilon\, \kappa(K)` whatever the spread of ``D`` (Demmel &
  Veselić 1992), where a QR-based ``eigh`` only gives absolute accuracy
  :math:`\epsilon \lVert A \rVert`: an eigenvalue :math:`10^{-6}` times the
  largest has at most one correct digit in float32. Eigenvalues below ``floor`` only
  get absolute accuracy (so that numerically singular matrices terminate).

  Args:
    matrix: ``[T, T]`` symmetric positive semi-definite matrix.
    floor: an entry next to a diagonal below it is converged at ``tol``
      times the larger diagonal, and between two such diagonals at ``tol``
      times the largest diagonal.
    tol: relative off-diagonal tolerance; ``None`` for ``max(T, 8)`` machine
      epsilons (the rounding of the rotations leaves a few).
    max_sweeps: bound on the sweeps (each ``T - 1`` or ``T`` rounds).

  Returns:
    ``(eigvals [T], eigvecs [T, T], info)``: unsorted eigenvalues and the
    eigenvectors as columns. NaN or infinite input gives NaN without
    iterating.
  """
  matrix = jnp.asarray(matrix)
  num = matrix.shape[0]
  dtype = jnp.result_type(matrix.dtype, jnp.float32)
  matrix = matrix.astype(dtype)
  tol = max(num, 8) * float(jnp.finfo(dtype).eps) if tol is None else tol
  finite = jnp.all(jnp.isfinite(matrix))
  matrix = jnp.where(finite, 0.5 * (matrix + matrix.T), 0)
  tol = jnp.asarray(tol, dtype)
  partners = jnp.asarray(_round_robin(num))  # [rounds, T]
  index = jnp.arange(num)
  floor = jnp.asarray(floor, dtype)

  def limits(diag_i, diag_j, largest):
    # Off-diagonal entries up to this are converged: tol sqrt(A_ii A_jj)
    # between diagonals above the floor (relative accuracy of both
    # eigenvalues); tol max(A_ii, A_jj) next to a diagonal below it (the
    # large one's eigenvector still moves by at most tol); tol max_k A_kk
    # between two below it (the rounding of the rotations leaves entries of
    # that size there; the eigenvalues above the floor do not depend on
    # them).
    abs_i, abs_j = jnp.abs(diag_i), jnp.abs(diag_j)
    above_i, above_j = abs_i >= floor, abs_j >= floor
    both = tol * jnp.sqrt(abs_i) * jnp.sqrt(abs_j)
    one = tol * jnp.maximum(abs_i, abs_j)
    return jnp.where(above_i & above_j, both, jnp.where(above_i | above_j, one, tol * largest))

  def off_measure(a):
    # The largest off-diagonal entry in units of its limit, times tol.
    diag = jnp.diagonal(a)
    limit = limits(diag[:, None], diag[None, :], jnp.max(jnp.abs(diag)))
    ratio = jnp.abs(a) * base.safe_reciprocal(limit)
    ratio = jnp.where((limit == 0) & (a != 0), jnp.inf, ratio)
    return tol * jnp.max(jnp.where(jnp.eye(num, dtype=bool), 0, ratio))

  def rotate_round(r, carry):
    a, v = carry
    partner = partners[r]
    p = jnp.minimum(index, partner)
    q = jnp.maximum(index, partner)
    app, aqq, apq = a[p, p], a[q, q], a[p, q]
    largest = jnp.max(jnp.abs(jnp.diagonal(a)))
    # Rotate above an eighth of the limit: a margin between the level the
    # rounding of the rotations keeps entries at and the convergence test.
    rotate = (partner != index) & (jnp.abs(apq) > 0.125 * limits(app, aqq, largest))
    zeta = (aqq - app) / (2 * jnp.where(rotate, apq, 1))
    t = jnp.where(zeta >= 0, 1, -1) / (jnp.abs(zeta) + jnp.hypot(1, zeta))
    t = jnp.where(rotate, t, 0)
    cos = lax.rsqrt(1 + t * t)
    sin = t * cos
    c = cos  # [T]: coefficient of the own row / column
    s = jnp.where(index == p, -sin, sin)  # of the partner's
    a = c[:, None] * a + s[:, None] * a[partner, :]
    a = a * c[None, :] + a[:, partner] * s[None, :]
    new_diag = jnp.where(index == p, app - t * apq, aqq + t * apq)
    a = a.at[index, index].set(jnp.where(rotate, new_diag, jnp.diagonal(a)))
    a = a.at[index, partner].set(jnp.where(rotate, 0, a[index, partner]))
    v = v * c[None, :] + v[:, partner] * s[None, :]
    return a, v

  def cond(carry):
    _, _, sweeps, off = carry
    return (sweeps < max_sweeps) & (off > tol)

  def body(carry):
    a, v, sweeps, _ = carry
    a, v = lax.fori_loop(0, partners.shape[0], rotate_round, (a, v))
    return a, v, sweeps + 1, off_measure(a)

  eye = jnp.eye(num, dtype=dtype)
  start_off = jnp.where(finite, off_measure(matrix), 0)
  a, v, sweeps, off = lax.while_loop(cond, body, (matrix, eye, jnp.zeros([], jnp.int32), start_off))
  eigvals = jnp.where(finite, jnp.diagonal(a), jnp.nan)
  eigvecs = jnp.where(finite, v, jnp.nan)
  info = SolverInfo(
    iterations=sweeps,
    residual=jnp.where(finite, off, jnp.nan).astype(jnp.float32),
    converged=finite & (off <= tol),
  )
  return eigvals, eigvecs, info


def default_threshold(num_tasks: int) -> float:
  """The reference's relative eigenvalue cut-off: ``T`` float32 epsilons."""
  return num_tasks * float(np.finfo(np.float32).eps)


def aligned_mtl_weights(
  gram: jax.typing.ArrayLike,
  pref: jax.typing.ArrayLike | None = None,
  *,
  scale: Scale = "min",
  eigenvalue_threshold: float | jax.Array | None = None,
  max_sweeps: int | jax.Array = 30,
) -> tuple[jax.Array, SolverInfo]:
  """Aligned-MTL weights ``B p`` from a ``[T, T]`` Gram matrix (see :func:`aligned_mtl`)."""
  gram = jnp.asarray(gram)
  num = gram.shape[0]
  dtype = jnp.result_type(gram.dtype, jnp.float32)
  gram = gram.astype(dtype)
  pref = preference(None if pref is None else jnp.asarray(pref), num, dtype, "aligned_mtl")
  threshold = default_threshold(num) if eigenvalue_threshold is None else eigenvalue_threshold
  threshold = jnp.asarray(threshold, dtype)
  # Kept eigenvalues exceed threshold * max_t G_tt: below that, absolute
  # accuracy is enough (and all a rank-deficient Gram's noise allows).
  floor = threshold * jnp.max(jnp.abs(jnp.diagonal(gram)))
  eigvals, eigvecs, info = graded_eigh(gram, floor=floor, max_sweeps=max_sweeps)
  largest = jnp.max(eigvals)
  kept = (eigvals > threshold * largest) & (largest > 0)
  rank = jnp.sum(kept)
  if scale == "min":
    sigma_sq = jnp.min(jnp.where(kept, eigvals, jnp.inf))
  elif scale == "median":  # torch.median: the lower median for an even count
    ascending = jnp.sort(jnp.where(kept, eigvals, jnp.inf))
    sigma_sq = ascending[jnp.maximum(rank - 1, 0) // 2]
  else:  # "rmse": the root mean square of the kept singular values
    sigma_sq = jnp.sum(jnp.where(kept, eigvals, 0)) / jnp.maximum(rank, 1)
  root = jnp.sqrt(jnp.where(kept, eigvals, 1))
  coef = jnp.where(kept, jnp.sqrt(jnp.where(rank > 0, sigma_sq, 1)) / root, 0)
  weights = eigvecs @ (coef * (eigvecs.T @ pref))  # B p
  weights = jnp.where(rank > 0, weights, pref)  # rank 0: B = I (torchjd)
  return jnp.where(jnp.any(jnp.isnan(gram)), jnp.nan, weights), info


def aligned_mtl(
  *,
  scale: Scale = "min",
  eigenvalue_threshold: float | jax.Array | None = None,
  pref_vector: jax.typing.ArrayLike | None = None,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_sweeps: int | jax.Array = 30,
) -> base.BalancingTransformation:
  r"""Aligned-MTL: align the principal components of the task gradients.

  Aligned-MTL (Senushkin et al. 2023, Algorithm 1) replaces the task
  gradients by the closest system with orthogonal, equal-norm components.
  With :math:`G = J J^T = V \Lambda V^T` and the eigenvalues above the
  threshold kept,

  .. math::

     B = \sqrt{\lambda_{s}}\; V \Lambda^{-1/2} V^T, \qquad
     w = B p, \qquad d = \sum_t w_t g_t = J^T B p ,

  with :math:`p = \mathbb{1}/T` by default and :math:`\lambda_s` the
  smallest kept eigenvalue (``scale="min"``, the paper's :math:`\sigma_{min}^2`).
  :math:`J^T B = \sigma_s W V^T` for the SVD :math:`J = V \Sigma W^T`: every
  principal direction of the task gradients gets the same length
  :math:`\sigma_s`, so the condition number of the aligned system is 1.

  Eigenvalues at or below ``eigenvalue_threshold`` times the largest are
  dropped (their directions get no weight); the default is the reference's
  :math:`T \epsilon_{32}` (:math:`T \times 1.19 \cdot 10^{-7}`), i.e.
  singular values below :math:`\sqrt{T \epsilon_{32}} \approx 6 \cdot 10^{-4}
  \sqrt{T}` times the largest.

  **Accuracy.** The spectrum is computed by a Jacobi method with a relative
  stopping rule (:func:`graded_eigh`), so the kept eigenvalues and their
  eigenvectors have relative accuracy of about :math:`\epsilon\,\kappa(K)`,
  with :math:`K` the cosine matrix of the gradients, whatever their norms.
  Measured against a float64 SVD of ``J`` (T up to 40, norms spread up to
  :math:`10^{\pm 10}`, rank-deficient Jacobians): ``d`` within about
  :math:`10^{-6}` relative for independent gradients, :math:`10^{-5}` for
  rank-deficient ones, where a float32 ``eigh`` of ``G`` (absolute accuracy
  :math:`\epsilon \lambda_{max}`, no correct digit near the default
  threshold) is off by up to :math:`10^{-2}` once the norms differ by a
  factor of about 30. What no method can recover from a float32 Gram are
  directions whose cosine structure is itself degenerate to :math:`\epsilon`
  (nearly parallel gradients): those eigenvalues sit at the rounding level
  of ``K`` and fall under the threshold. The method is not invariant to
  rescaling one task's loss, so large scale spreads are not removed: a task
  whose gradient norm is below about :math:`\sqrt{T \epsilon_{32}}` times
  the largest (:math:`6 \cdot 10^{-4}` for three tasks) falls below the
  default threshold and is dropped.

  Properties: linear, permutation-equivariant, positively homogeneous. Not
  non-conflicting in general, not invariant to rescaling one task's loss.

  Args:
    scale: :math:`\lambda_s`: ``"min"`` (the paper and the reference
      default), ``"median"`` (the lower median of the kept eigenvalues, as
      ``torch.median``) or ``"rmse"`` (their mean, i.e. the root mean square
      of the kept singular values) — the reference code's ``scale_mode``.
    eigenvalue_threshold: relative cut-off (may be traced); ``None`` for
      ``T * 1.19e-7``.
    pref_vector: ``[T]`` task weights :math:`p`; ``None`` for
      :math:`\mathbb{1}/T` (torchjd); ``jnp.ones(T)`` reproduces the
      reference code, which sums the aligned gradients.
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).
    max_sweeps: bound on the Jacobi sweeps (typically 4 to 8 are needed).

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its
    ``state.weighting_state.info`` reports the eigendecomposition.

  Example:
    >>> import jax.numpy as jnp
    >>> import mtgrad
    >>> tx = mtgrad.aligned_mtl(num_tasks=2)
    >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> [round(x, 4) for x in updates["w"].tolist()]  # both directions at length 1
    [0.5, 0.5]
    >>> [round(x, 4) for x in state.weights.tolist()]
    [0.1667, 0.5]

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023 (arXiv:2305.19000);
    reference code ``ProcrustesSolver`` (SamsungLabs/MTL) and torchjd's
    ``AlignedMTL``.
    Demmel & Veselić, *Jacobi's method is more accurate than QR*, SIAM J.
    Matrix Anal. Appl. 13 (1992).

  Warning:
    Deviations from the reference code: it sums the aligned gradients
    (:math:`w = B \mathbb{1}`); the default here is torchjd's mean
    (:math:`p = \mathbb{1}/T`, ``T`` times smaller; ``pref_vector`` restores
    it). The eigendecomposition is the scale-aware Jacobi method instead of
    a float32 ``symeig``/``eigh``, so which eigenvalues pass the threshold
    can differ where the reference's are rounding noise. An all-zero Gram
    gives :math:`B = I` (torchjd), where the reference fails.
  """
  if scale not in _SCALES:
    raise ValueError(f"mtgrad.aligned_mtl: scale must be one of {_SCALES}, got {scale!r}.")
  if (
    isinstance(eigenvalue_threshold, (int, float))
    and not isinstance(eigenvalue_threshold, bool)
    and not 0 <= eigenvalue_threshold < 1
  ):
    raise ValueError(
      f"mtgrad.aligned_mtl: eigenvalue_threshold must be in [0, 1), got {eigenvalue_threshold!r}."
    )
  if isinstance(max_sweeps, (int, float)) and (not isinstance(max_sweeps, int) or max_sweeps < 1):
    raise ValueError(f"mtgrad.aligned_mtl: max_sweeps must be a positive int, got {max_sweeps!r}.")
  pref = check_pref_vector(pref_vector, "aligned_mtl")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, state, key, num_tasks
    weights, info = aligned_mtl_weights(
      gram, pref, scale=scale, eigenvalue_threshold=eigenvalue_threshold, max_sweeps=max_sweeps
    )
    return weights, AlignedMTLState(info)

  return base.from_weighting(
    weighting,
    name="aligned_mtl",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_aligned_mtl_state,
    blocks=blocks,
  )
