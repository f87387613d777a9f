"""IMTL-G: the gradient part of Impartial Multi-Task Learning (Liu et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers.cosine import norms_and_cosines


class IMTLGState(NamedTuple):
  """Weighting state of :func:`imtl_g` (``state.weighting_state``).

  Attributes:
    rank: numerical rank of the cosine matrix at the last update (eigenvalues
      kept above ``rcond``): fewer than ``T`` means dependent task
      directions (int32; one per block when block-wise).
  """

  rank: jax.Array  # [] int32


def _imtl_g_weights(gram: jax.Array, rcond: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IMTL-G weights and the cosine matrix's numerical rank (see :func:`imtl_g`)."""
  norms, cosine = norms_and_cosines(gram)  # K = D^-1 G D^-1
  inv = base.safe_reciprocal(norms)  # 1 / ||g_t||, 0 for zero tasks
  live = (norms > 0).astype(gram.dtype)  # [T]
  eigvals, eigvecs = jnp.linalg.eigh(cosine)
  keep = eigvals > rcond * jnp.maximum(eigvals[-1], 0)
  coef = jnp.where(keep, eigvecs.T @ live, 0)  # components of 1 in range(K)
  z = eigvecs @ (coef * base.safe_reciprocal(jnp.where(keep, eigvals, 0)))  # K^+ 1
  v = inv * z  # D^-1 K^+ 1 (= G^+ sqrt(diag G) for full-rank G)
  weights = v * base.safe_reciprocal(jnp.sum(v))
  # No direction has (least-squares) equal positive projections on the unit
  # gradients when 1 is numerically orthogonal to range(K) (e.g. g and -g).
  solvable = jnp.sum(coef**2) > rcond * jnp.sum(live)
  weights = jnp.where(solvable, weights, 0)
  weights = jnp.where(jnp.any(jnp.isnan(gram)), jnp.nan, weights)
  return weights, jnp.sum(keep).astype(jnp.int32)


def imtl_g(
  *,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  rcond: float | jax.Array = 1e-5,
) -> base.BalancingTransformation:
  r"""IMTL-G: the aggregate has equal projections on every unit task gradient.

  IMTL-G looks for :math:`d = \sum_t w_t g_t` with :math:`\sum_t w_t = 1`
  such that :math:`\langle d, u_t\rangle` is the same for every task, where
  :math:`u_t = g_t / \lVert g_t\rVert`: no task is favoured, whatever the scale
  of its loss. The paper's closed form is
  :math:`w_{2:T} = g_1 U^\top (D U^\top)^{-1}`, :math:`w_1 = 1 - \sum_{t\ge2} w_t`,
  with rows :math:`D_t = g_1 - g_t` and :math:`U_t = u_1 - u_t`. On the Gram
  matrix it reads

  .. math::

     v = G^{+} \sqrt{\operatorname{diag} G}, \qquad w = v / \textstyle\sum_t v_t,

  since :math:`(G v)_t = \langle g_t, J^\top v\rangle = \lVert g_t\rVert`
  says that :math:`J^\top v` has projection 1 on every :math:`u_t`.

  With :math:`D = \operatorname{diag}(\lVert g_t\rVert)` and the cosine matrix
  :math:`K = D^{-1} G D^{-1}`, :math:`G^{-1} D \mathbf{1} = D^{-1} K^{-1}
  \mathbf{1}`; mtgrad computes :math:`v = D^{-1} K^{+} \mathbf{1}` with an
  eigendecomposition of ``K``, whose entries are all of order one, instead of
  a pseudo-inverse of ``G``, whose entries may span twenty orders of magnitude
  (a float32 ``pinv(G)`` then treats the small tasks as null space). For
  independent gradients the two are identical (and equal the paper's closed
  form). For dependent gradients, :math:`K^{+}\mathbf{1}` gives
  :math:`J^\top v = U^{+}\mathbf{1}`, the least-norm direction whose
  projections on the unit gradients are closest to equal (least squares over
  the unit vectors). It coincides with :math:`G^{+}\sqrt{\operatorname{diag} G}`
  when equal projections are attainable (duplicated tasks, or more tasks than
  dimensions in a consistent configuration); otherwise
  :math:`G^{+}\sqrt{\operatorname{diag} G}` weights task ``t``'s residual by
  :math:`\lVert g_t\rVert^2`, which depends on the loss scales (for ``g`` and
  ``-a g`` it gives :math:`\frac{1+a^2}{1-a} g`, unbounded as ``a -> 1``,
  where this form gives 0).

  Eigenvalues of ``K`` at or below ``rcond * max eigenvalue`` are treated as
  zero. ``K`` has unit diagonal, so ``rcond`` is a threshold on the
  conditioning of the *directions* alone, independent of the gradient scales:
  the default ``1e-5`` sits above the float32 rounding of a cosine matrix
  computed from float32 gradients (about :math:`T \epsilon`), and treats two
  tasks whose cosine exceeds about ``1 - 2e-5`` as one direction.

  Properties: linear (the state's ``weights`` reproduce the update),
  permutation-equivariant and positively homogeneous. Rescaling one task's
  loss leaves the unit vectors, ``K`` and hence the *line* of the update
  unchanged, but not the update: the normalisation :math:`\sum_t w_t = 1` on
  the raw gradients gives :math:`\langle d, u_t\rangle = 1/\sum_t v_t` with
  :math:`v_t = (K^{+}\mathbf{1})_t / \lVert g_t\rVert`, so the length (and, when
  :math:`K^{+}\mathbf{1}` has mixed signs, even the sign) of ``d`` depends on
  the gradient scales; the length is dominated by the smallest gradients.

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).
    rcond: relative eigenvalue cutoff of the cosine matrix (may be traced).

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its ``weighting_state`` is an
    :class:`IMTLGState` recording the numerical rank of the cosine matrix.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.imtl_g(num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"], state.weights
    (Array([0.75, 0.75], dtype=float32), Array([0.75, 0.25], dtype=float32))
    >>> int(state.weighting_state.rank)
    2

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021 (openreview.net/forum?id=IMPnRXEWpvr).
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024 (arXiv:2406.16232): the Gram form :math:`G^{+}\sqrt{\operatorname{diag} G}`.

  Warning:
    The paper computes IMTL-G on the gradients with respect to the shared
    *features* and applies the weights to the losses; here it applies to
    whatever task gradients are given (usually the parameters). The paper
    pairs it with IMTL-L (:func:`mtgrad.imtl_l`; the hybrid of both, as
    LibMTL's ``IMTL``, is :func:`mtgrad.imtl`, with the same
    :math:`\sum_t w_t = 1` output scale as here). A task whose
    gradient is exactly zero gets weight 0. If :math:`\sum_t v_t = 0` the
    paper's system is singular and the weights are 0; near it they are large
    (the paper's normalisation), and if :math:`\sum_t v_t < 0` the update
    has the same *negative* projection on every task.
  """
  if isinstance(rcond, (int, float)) and not isinstance(rcond, bool) and not 0 <= rcond < 1:
    raise ValueError(f"mtgrad.imtl_g: rcond must be in [0, 1), got {rcond!r}.")

  def init_state(num_tasks):
    del num_tasks
    return IMTLGState(rank=jnp.zeros([], jnp.int32))

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key, num_tasks, state
    weights, rank = _imtl_g_weights(gram, jnp.asarray(rcond, gram.dtype))
    return weights, IMTLGState(rank=rank)

  return base.from_weighting(
    weighting,
    name="imtl_g",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_state,
    blocks=blocks,
  )
