"""Sum of unit task gradients (Su Jianlin, multi-task learning part 1)."""

from __future__ import annotations

import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree


def inverse_norm(
  *, num_tasks: int | None = None, blocks: tree.Blocks = None
) -> base.BalancingTransformation:
  r"""Sum of unit task gradients: :math:`w_t = 1 / \lVert g_t \rVert`.

  .. math::

     d = \sum_t \frac{g_t}{\lVert g_t \rVert}

  Su (part 1) asks which weights make training invariant to rescaling each
  loss, :math:`L_t \to c_t L_t`, and to shifting it: weights that depend on
  the losses only through their gradients, with :math:`w_t \propto
  1/\lVert g_t \rVert`. The direction is then invariant to every per-task
  positive rescaling, and the update has no scale of its own (pair it with
  an adaptive optimizer or a learning-rate schedule).

  Only the Gram diagonal is computed (``T`` dot products per element instead
  of ``T^2``).

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` (unit gradients per parameter
      tensor) or a grouping of leaves; see :func:`mtgrad.from_weighting`.

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.inverse_norm()
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.0, 0.1]])}
    >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}))[0]
    {'w': Array([0.6, 1.8], dtype=float32)}

  References:
    Su Jianlin, *多任务学习漫谈（一）：以损失之名* (Multi-task learning, part 1:
    in the name of the loss),
    kexue.fm, 2022 (part 1 of the series; part 3 is kexue.fm/archives/8907).

  Warning:
    A task whose gradient is exactly zero gets weight 0 (not ``1/0``), so
    zero gradients give a finite (zero) contribution.
  """

  def weighting(sq_norms, losses, state, key, *, num_tasks):
    del losses, key, num_tasks
    return base.safe_reciprocal(jnp.sqrt(sq_norms)), state

  return base.from_weighting(
    weighting, name="inverse_norm", needs="sq_norms", num_tasks=num_tasks, blocks=blocks
  )
