"""ConFIG: conflict-free inverse gradients (Liu, Chu & Thuerey 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers.cosine import norms_and_cosines


def conflict_free_weights(gram: jax.typing.ArrayLike, rcond: float | jax.Array = 1e-5) -> jax.Array:
  r"""ConFIG weights from a ``[T, T]`` Gram matrix (see :func:`conflict_free`)."""
  gram = jnp.asarray(gram)
  gram = gram.astype(jnp.result_type(gram.dtype, jnp.float32))
  nan = jnp.any(jnp.isnan(gram))
  norms, cosine = norms_and_cosines(gram)  # K = U U^T = D^-1 G D^-1
  inv = base.safe_reciprocal(norms)  # 1 / ||g_t||, 0 for zero tasks
  live = (norms > 0).astype(gram.dtype)  # [T]
  eigvals, eigvecs = jnp.linalg.eigh(cosine)
  rcond = jnp.asarray(rcond, gram.dtype)
  keep = eigvals > rcond * jnp.maximum(eigvals[-1], 0)
  inv_eigvals = base.safe_reciprocal(jnp.where(keep, eigvals, 0))
  ones = jnp.where(keep, eigvecs.T @ live, 0)  # 1 in the eigenbasis, range(K) only
  z = eigvecs @ (ones * inv_eigvals)  # K^+ 1: pinv(U) 1 = U^T z
  sq_length = jnp.sum(ones**2 * inv_eigvals)  # ||pinv(U) 1||^2 = 1^T K^+ 1
  # sum_t <g_t, pinv(U) 1> = n^T K K^+ 1 = n^T P 1 (P: projector onto range(K)).
  projection = jnp.sum(jnp.where(keep, eigvecs.T @ norms, 0) * ones)
  # d = (sum_t <g_t, x^>) x^ with x^ = U^T z / ||U^T z||, on the raw gradients:
  weights = inv * z * (projection * base.safe_reciprocal(sq_length))
  # pinv(U) 1 = 0 (e.g. opposite gradients) has no direction: the reference
  # normalises it to the zero vector; so does a numerically zero one.
  solvable = jnp.sum(ones**2) > rcond * jnp.sum(live)
  weights = jnp.where(solvable, weights, 0)
  return jnp.where(nan, jnp.nan, weights)


def conflict_free(
  *,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  rcond: float | jax.Array = 1e-5,
) -> base.BalancingTransformation:
  r"""ConFIG: the direction with equal cosine to every task gradient.

  With the unit task gradients :math:`u_t = g_t / \lVert g_t \rVert` (rows
  of :math:`U`), ConFIG (Liu, Chu & Thuerey 2024, equation 2) updates along

  .. math::

     \hat d = \frac{U^{+} \mathbb{1}}{\lVert U^{+} \mathbb{1} \rVert}, \qquad
     d = \Big(\sum_t \langle g_t, \hat d \rangle\Big)\, \hat d .

  When :math:`U` has full row rank, :math:`U U^{+} \mathbb{1} = \mathbb{1}`:
  :math:`\hat d` has the same positive cosine with every task gradient, so no
  task conflicts with the update and none dominates it; the length is the
  sum of the projections of the task gradients on it.

  **Gram-only form.** With the cosine matrix :math:`K = U U^T =
  D^{-1} G D^{-1}`, :math:`D = \operatorname{diag}(\lVert g_t \rVert)`,
  :math:`U^{+} \mathbb{1} = U^T K^{+} \mathbb{1}`, so with
  :math:`z = K^{+} \mathbb{1}` and :math:`n = (\lVert g_t \rVert)_t`,

  .. math::

     w_t = \frac{z_t}{\lVert g_t \rVert}\,
           \frac{n^T K z}{z^T K z}, \qquad d = \sum_t w_t g_t ,

  where :math:`n^T K z = \sum_t \langle g_t, U^{+}\mathbb{1} \rangle` and
  :math:`z^T K z = \lVert U^{+} \mathbb{1} \rVert^2`.
  :math:`K^{+}` comes from an eigendecomposition of ``K``, whose entries are
  all of order one whatever the gradient scales; eigenvalues at or below
  ``rcond`` times the largest are treated as zero (``K`` has unit diagonal,
  so this is a threshold on the conditioning of the directions alone).

  Properties: linear, permutation-equivariant, positively homogeneous; the
  direction (not the length) is invariant to rescaling each task's loss.
  Non-conflicting when the task gradients are linearly independent; with
  dependent gradients :math:`U^{+}\mathbb{1}` is the least-squares solution
  of :math:`U x = \mathbb{1}` and some tasks may conflict with it.

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).
    rcond: relative eigenvalue cutoff of the cosine matrix (may be traced).

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp
    >>> import mtgrad
    >>> tx = mtgrad.conflict_free(num_tasks=2)
    >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> [round(x, 4) for x in updates["w"].tolist()]  # along (1, 1), length 3/sqrt(2)
    [1.5, 1.5]

  References:
    Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks*, 2024 (arXiv:2408.11104); reference code
    ``conflictfree.grad_operator.ConFIG_update`` (tum-pbs/ConFIG) and
    torchjd's ``ConFIG``.

  Warning:
    Deviations from the reference code: it computes :math:`U^{+}\mathbb{1}`
    with ``torch.linalg.lstsq`` (``use_least_square=True``, the default) or
    ``torch.linalg.pinv`` on the ``[T, D]`` unit gradients, whose default
    cut-offs are relative to ``max(T, D)`` machine epsilons (for a large
    model, about ``0.1`` of the largest singular value in float32); here the
    cut-off is ``rcond`` on the eigenvalues of ``K`` (the squared singular
    values of ``U``), independent of ``D``. Both reference options are the
    same mathematical solution for independent gradients, so there is no
    ``use_least_square`` option. For two tasks the reference uses a closed
    form (``ConFIG_update_double``) that gives the same direction when the
    gradients are not parallel and NaN when they are; here the general form
    is used for every ``T``. Only the default weight model (equal weights)
    and length model (``ProjectionLength``) are provided. Zero gradients
    get weight 0 and take no part in the direction, as in the reference
    (``nan_to_num`` of the unit vectors).
  """
  if isinstance(rcond, (int, float)) and not isinstance(rcond, bool) and not 0 <= rcond < 1:
    raise ValueError(f"mtgrad.conflict_free: rcond must be in [0, 1), got {rcond!r}.")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key, num_tasks
    return conflict_free_weights(gram, rcond), state

  return base.from_weighting(
    weighting, name="conflict_free", needs="gram", num_tasks=num_tasks, blocks=blocks
  )
