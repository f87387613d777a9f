"""Primary and auxiliary tasks: min-norm point of a hull plus a cone (Su, part 3)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers import min_norm as solver
from mtgrad._src.solvers.info import SolverState


def _primary_indices(primary: int | Sequence[int]) -> tuple[int, ...]:
  """Validates ``primary`` (an int or a sequence of ints) into sorted indices."""
  items = [primary] if isinstance(primary, str) or np.ndim(primary) == 0 else list(primary)
  indices = []
  for item in items:
    if isinstance(item, bool | np.bool_):
      raise ValueError(f"mtgrad.min_norm: primary must be task indices (ints), got {primary!r}.")
    try:
      index = operator.index(item)
    except TypeError:
      raise ValueError(
        f"mtgrad.min_norm: primary must be an int or a sequence of ints (static: "
        f"with optax.inject_hyperparams, name it in static_args), got {primary!r}."
      ) from None
    if index < 0:
      raise ValueError(f"mtgrad.min_norm: primary task indices must be >= 0, got {primary!r}.")
    indices.append(index)
  if not indices:
    raise ValueError("mtgrad.min_norm: primary must name at least one task.")
  return tuple(sorted(set(indices)))


def _check_range(indices: tuple[int, ...], num_tasks: int) -> None:
  if indices[-1] >= num_tasks:
    raise ValueError(
      f"mtgrad.min_norm: primary task index {indices[-1]} is out of range for "
      f"T={num_tasks} tasks (valid: 0..{num_tasks - 1})."
    )


def min_norm(
  primary: int | Sequence[int] = 0,
  *,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | None = None,
  tol: float | None = None,
) -> base.BalancingTransformation:
  r"""Learn the primary tasks; the auxiliary ones may help but not get worse.

  With primary tasks :math:`P` and auxiliary tasks :math:`A` (the others),

  .. math::

     d = \sum_{i \in P} a_i g_i + \sum_{j \in A} \lambda_j g_j , \qquad
     (a, \lambda) = \operatorname{argmin}_{a \in \Delta^{|P|},\,
     \lambda \ge 0} \lVert d \rVert^2 ,

  the min-norm point of :math:`\operatorname{conv}\{g_i\}_{i \in P} +
  \operatorname{cone}\{g_j\}_{j \in A}` (Su, part 3). For one primary task
  ``0`` it is the dual of

  .. math::

     \max_u \; \langle u, g_0 \rangle - \tfrac12 \lVert u \rVert^2
     \quad \text{s.t.} \quad \langle u, g_j \rangle \ge 0 \;\; (j \in A):

  the update closest to plain descent on the primary task under which no
  auxiliary loss increases to first order; :math:`d = g_0` when no auxiliary
  gradient conflicts with it. One auxiliary task has the closed form
  :math:`\lambda = \operatorname{relu}(-\langle g_0, g_1 \rangle) / \lVert
  g_1 \rVert^2`. The optimum satisfies :math:`\langle d, g_i \rangle \ge
  \lVert d \rVert^2` for :math:`i \in P` and :math:`\langle d, g_j \rangle
  \ge 0` for :math:`j \in A` (with equality where the weight is positive).
  With every task primary it is :func:`mtgrad.mgda`.

  The weights are the exact optimum of the quadratic program (the active-set
  solver of :func:`mtgrad.mgda`), not Su's coordinate iteration, which
  converges to it only in the limit.

  Args:
    primary: index of the primary task, or a sequence of indices (static
      Python ints; duplicates are ignored). Checked against ``T`` when the
      transform is built with ``num_tasks`` and at trace time otherwise.
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves: one
      problem per block (see :func:`mtgrad.from_weighting`).
    max_iters: solver iteration budget; ``None`` for ``4 T + 20``.
    tol: tolerance on the solver's scaled KKT residual; ``None`` for 30
      machine epsilons of the solver dtype.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its
    ``state.weighting_state.info`` is the :class:`mtgrad.SolverInfo` of the
    last solve.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.min_norm(primary=0, num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 1.0], [-1.0, 0.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].round(4), state.weights.round(4)
    (Array([0., 1.], dtype=float32), Array([1., 1.], dtype=float32))

  References:
    Su Jianlin, *多任务学习漫谈（三）：分主次之序* (Multi-task learning, part 3:
    primary and auxiliary tasks), kexue.fm/archives/8907, 2022.

  Warning:
    An auxiliary task with a zero gradient gets weight 0. A primary task
    with a zero gradient makes ``d = 0`` (it is the min-norm point).
  """
  indices = _primary_indices(primary)
  if isinstance(num_tasks, int):
    _check_range(indices, num_tasks)

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, state, key
    _check_range(indices, num_tasks)
    mask = np.zeros(num_tasks, bool)
    mask[list(indices)] = True
    weights, info = solver.min_norm_weights(gram, mask, max_iters=max_iters, tol=tol)
    return weights, SolverState(info)

  return base.from_weighting(
    weighting,
    name="min_norm",
    needs="gram",
    num_tasks=num_tasks,
    init_state=SolverState.initial,
    blocks=blocks,
  )
