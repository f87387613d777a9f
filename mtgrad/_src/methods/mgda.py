"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers import min_norm as solver
from mtgrad._src.solvers.info import SolverState

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(
  *,
  normalization: Normalization = "none",
  combine_with: Literal["normalized", "original"] = "normalized",
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | None = None,
  tol: float | None = None,
) -> base.BalancingTransformation:
  r"""Multiple-Gradient Descent Algorithm: the min-norm convex combination.

  .. math::

     w = \operatorname{argmin}_{w \in \Delta} w^T G w
       = \operatorname{argmin}_{w \in \Delta}
         \Big\lVert \sum_t w_t g_t \Big\rVert^2 ,
     \qquad d = \sum_t w_t g_t .

  :math:`d` is the min-norm point of the convex hull of the task gradients.
  It satisfies :math:`\langle d, g_t \rangle \ge \lVert d \rVert^2` for every
  task (equality where :math:`w_t > 0`), so a small enough step along
  :math:`-d` decreases every loss, and :math:`d = 0` exactly at a Pareto
  stationary point (Désidéri 2012; Sener & Koltun 2018; Su, part 2: the
  dual of :math:`\max_u \min_t \langle g_t, u \rangle - \frac12 \lVert u
  \rVert^2`).

  The weights are the exact optimum of the quadratic program, computed on
  the Gram matrix by an active-set method (:func:`min_norm_weights
  <mtgrad._src.solvers.min_norm.min_norm_weights>`, scale-free: gradients
  whose norms differ by many orders of magnitude are handled), not by the
  Frank-Wolfe iterations of the reference code, which stop short of it.

  **Gradient normalisation** (optional, from the reference code and LibMTL,
  not in the paper): each gradient is divided by :math:`n_t` before the
  solve, with :math:`n_t = \lVert g_t \rVert` (``"l2"``), :math:`L_t`
  (``"loss"``) or :math:`L_t \lVert g_t \rVert` (``"loss+"``). The
  min-norm weights :math:`s \in \Delta` are computed for the normalised
  gradients :math:`\tilde g_t = g_t / n_t`; the update is, as in LibMTL,
  :math:`d = \sum_t s_t \tilde g_t`, i.e. ``weights`` :math:`w_t = s_t /
  n_t` (``combine_with="normalized"``). The official code of Sener & Koltun
  applies :math:`s` to the original losses instead, :math:`d = \sum_t s_t
  g_t` (``combine_with="original"``); that update is no longer a min-norm
  point and can conflict with a task (:math:`\langle d, g_t \rangle <
  0`), while the LibMTL form keeps the MGDA conditions for the normalised
  gradients, hence :math:`\langle d, g_t \rangle \ge 0` for positive
  normalisers. ``"l2"`` and ``"loss"`` make the update invariant to
  rescaling a task's loss (:math:`L_t \to c_t L_t`).

  Args:
    normalization: ``"none"`` (the paper), ``"l2"``, ``"loss"`` or
      ``"loss+"``; the loss-based ones need ``losses=`` in ``update``.
    combine_with: with a normalisation, apply the min-norm weights to the
      ``"normalized"`` gradients (LibMTL) or to the ``"original"`` ones
      (Sener & Koltun's code). Ignored for ``"none"``.
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves: one
      min-norm problem per block (see :func:`mtgrad.from_weighting`).
    max_iters: solver iteration budget; ``None`` for ``4 T + 20`` (the
      solver typically needs about as many iterations as the optimum has
      non-zero weights).
    tol: tolerance on the solver's scaled KKT residual; ``None`` for 30
      machine epsilons of the solver dtype.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its
    ``state.weighting_state.info`` is the :class:`mtgrad.SolverInfo` of the
    last solve.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.mgda(num_tasks=2)
    >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> [round(x, 4) for x in updates["w"].tolist()]  # the min-norm point
    [0.4, 0.8]
    >>> [round(x, 4) for x in state.weights.tolist()]
    [0.2, 0.8]
    >>> bool(state.weighting_state.info.converged)
    True

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018 (arXiv:1810.04650).
    Désidéri, *Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization*, C. R. Math. 350 (2012).
    Su Jianlin, *多任务学习漫谈（二）：行梯度之事* (Multi-task learning, part 2),
    kexue.fm, 2022-02-08.
    Lin & Zhang, *LibMTL: A Python Library for Multi-Task Learning*, JMLR 24
    (2023).

  Warning:
    Deviations from the reference code: the solver is exact (the reference
    Frank-Wolfe stops after 250 iterations or a ``1e-5`` change); for
    ``T = 2`` the reference clips the weights to ``[0.001, 0.999]``, here
    they are exact (``0`` and ``1`` included). With a normalisation, a task
    whose normaliser is zero (zero gradient, zero loss) has a zero
    normalised gradient instead of ``g / 0``: it makes ``d = 0`` as an
    unnormalised zero gradient does. The loss normalisations assume positive
    losses.
  """
  if normalization not in _NORMALIZATIONS:
    raise ValueError(
      f"mtgrad.mgda: normalization must be one of {_NORMALIZATIONS}, got {normalization!r}."
    )
  if combine_with not in ("normalized", "original"):
    raise ValueError(
      f"mtgrad.mgda: combine_with must be 'normalized' or 'original', got {combine_with!r}."
    )

  def weighting(gram, losses, state, key, *, num_tasks):
    del state, key, num_tasks
    if normalization == "none":
      weights, info = solver.min_norm_weights(gram, max_iters=max_iters, tol=tol)
      return weights, SolverState(info)
    if normalization == "loss":
      normalizer = losses
    else:
      normalizer = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))  # [T] norms
      if normalization == "loss+":
        normalizer = losses * normalizer
    inverse = base.safe_reciprocal(jnp.asarray(normalizer, gram.dtype))  # [T]
    normalized_gram = (inverse[:, None] * gram) * inverse[None, :]
    weights, info = solver.min_norm_weights(normalized_gram, max_iters=max_iters, tol=tol)
    if combine_with == "normalized":
      weights = weights * inverse.astype(weights.dtype)
    return weights, SolverState(info)

  return base.from_weighting(
    weighting,
    name="mgda",
    needs="gram",
    needs_losses=normalization in ("loss", "loss+"),
    num_tasks=num_tasks,
    init_state=SolverState.initial,
    blocks=blocks,
  )
