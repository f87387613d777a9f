"""DualProj: the mean gradient projected onto the dual cone (torchjd)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods.upgrad import check_hyperparameters
from mtgrad._src.methods.upgrad import check_pref_vector
from mtgrad._src.methods.upgrad import preference
from mtgrad._src.solvers import dual_cone
from mtgrad._src.solvers.info import SolverState


def dualproj_weights(
  gram: jax.typing.ArrayLike,
  pref: jax.typing.ArrayLike | None = None,
  *,
  norm_eps: float | jax.Array = 0.0,
  reg_eps: float | jax.Array = 1e-4,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
):
  """DualProj weights from a ``[T, T]`` Gram matrix (see :func:`dualproj`).

  Returns:
    ``(weights [T], info)``.
  """
  gram = jnp.asarray(gram)
  matrix = dual_cone.regularized_gram(gram, norm_eps, reg_eps)
  pref = preference(
    None if pref is None else jnp.asarray(pref), gram.shape[0], matrix.dtype, "dualproj"
  )
  return dual_cone.project_weights(matrix, pref, max_iters=max_iters, tol=tol)


def dualproj(
  *,
  pref_vector: jax.typing.ArrayLike | None = None,
  norm_eps: float | jax.Array = 0.0,
  reg_eps: float | jax.Array = 1e-4,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | None = None,
  tol: float | jax.Array | None = None,
) -> base.BalancingTransformation:
  r"""DualProj: the mean gradient, projected onto the dual cone of the task gradients.

  The projection of :math:`\sum_t p_t g_t` (the mean for the default
  :math:`p = \mathbb{1}/T`) onto :math:`\{x : \langle x, g_t \rangle \ge 0\
  \forall t\}`, the directions that conflict with no task. It is
  Gradient Episodic Memory's projection (Lopez-Paz & Ranzato 2017,
  equation 11) with every task as a constraint, torchjd's ``DualProj``. On
  the Gram matrix:

  .. math::

     w = \operatorname{argmin}_v \; v^T \tilde G v \quad \text{s.t.} \quad
     v \ge p, \qquad \tilde G = G / \operatorname{tr}(G) + \epsilon_{reg} I ,
     \qquad d = \sum_t w_t g_t ,

  one box-constrained quadratic program, solved exactly by
  :func:`~mtgrad._src.solvers.dual_cone.project_weights` on the cosine matrix
  (gradient scales spanning many orders of magnitude are handled). Where the
  mean conflicts with no task, :math:`d` is the mean.

  Properties: linear, permutation-equivariant, positively homogeneous (with
  ``norm_eps = 0``), non-conflicting up to the regularisation: with
  ``reg_eps = 0``, :math:`\langle d, g_t \rangle \ge 0` up to the solver
  tolerance; with :math:`\epsilon_{reg} > 0`, :math:`\langle d, g_t \rangle
  \ge -\epsilon_{reg} \operatorname{tr}(G)\, w_t` (see :func:`upgrad
  <mtgrad._src.methods.upgrad.upgrad>`). Not invariant to rescaling one
  task's loss.

  Args:
    pref_vector: ``[T]`` weights :math:`p` of the combination that is
      projected; ``None`` for the mean.
    norm_eps: absolute trace threshold below which the Gram is treated as
      zero (weights :math:`\max(p, 0)`), as torchjd's ``norm_eps``; default
      ``0`` (torchjd: ``1e-4``; see :func:`upgrad
      <mtgrad._src.methods.upgrad.upgrad>`).
    reg_eps: :math:`\epsilon_{reg}`, relative to the trace (torchjd's
      ``reg_eps``).
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).
    max_iters: solver iteration budget; ``None`` for ``4 T + 20``.
    tol: relative KKT tolerance of the solver; ``None`` for 20 machine
      epsilons.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its
    ``state.weighting_state.info`` is the :class:`mtgrad.SolverInfo` of the
    last solve.

  Example:
    >>> import jax.numpy as jnp
    >>> import mtgrad
    >>> tx = mtgrad.dualproj(num_tasks=2, reg_eps=0.0)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [-2.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> [round(x, 4) for x in updates["w"].tolist()]  # the mean is (-0.5, 0.5)
    [0.0, 0.5]
    >>> [round(x, 4) for x in state.weights.tolist()]
    [1.0, 0.5]

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024 (arXiv:2406.16232); torchjd's ``DualProj``.
    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017.

  Warning:
    Deviations from torchjd: ``norm_eps`` defaults to ``0`` instead of
    ``1e-4`` (torchjd's absolute threshold makes small gradients fall back to
    the plain mean); the projection is solved in JAX on the device (float32
    or wider) instead of quadprog in float64 on the host. With a singular
    :math:`\tilde G` (``reg_eps=0`` and dependent gradients) ``d`` is unique
    but the weights need not be.
  """
  check_hyperparameters(
    "dualproj", norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol
  )
  pref = check_pref_vector(pref_vector, "dualproj")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, state, key, num_tasks
    weights, info = dualproj_weights(
      gram, pref, norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol
    )
    return weights, SolverState(info)

  return base.from_weighting(
    weighting,
    name="dualproj",
    needs="gram",
    num_tasks=num_tasks,
    init_state=SolverState.initial,
    blocks=blocks,
  )
