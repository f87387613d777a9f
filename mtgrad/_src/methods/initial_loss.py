"""Weights from the losses seen at the first update (prior normalisation)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base


class InitialLossState(NamedTuple):
  """State of :func:`initial_loss`.

  Attributes:
    initial_losses: the losses of the first update (zeros before it).
    recorded: whether ``initial_losses`` holds them yet.
  """

  initial_losses: jax.Array  # [T]
  recorded: jax.Array  # [] bool


def initial_loss(*, num_tasks: int | None = None) -> base.BalancingTransformation:
  r"""Weights :math:`w_t = 1 / L_t(0)`, the losses at the first update.

  .. math::

     d = \sum_t \frac{g_t}{L_t(0)} = \nabla_\theta \sum_t \frac{L_t}{L_t(0)}

  Each loss is measured relative to its initial value, so a rescaled loss
  :math:`c_t L_t` gives the same training (Su, part 1: the prior-based
  normalisation, e.g. :math:`L(0) = \log K` for a ``K``-way classifier at
  initialisation).

  Args:
    num_tasks: ``T`` (required: ``L(0)`` is kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; its state records ``initial_losses``.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.initial_loss(num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> _, state = tx.update(grads, state, losses=jnp.array([2.0, 0.5]))
    >>> tx.update(grads, state, losses=jnp.array([1.0, 0.1]))[0]
    {'w': Array([0.5, 2. ], dtype=float32)}

  References:
    Su Jianlin, *多任务学习漫谈（一）：以损失之名*,
    kexue.fm, 2022 (part 1 of the series; part 3 is kexue.fm/archives/8907).

  Warning:
    An initial loss that is exactly zero gets weight 0 instead of ``1/0``.
  """

  base.require_num_tasks(num_tasks, "initial_loss")

  def init_state(num_tasks):
    return InitialLossState(
      initial_losses=jnp.zeros(num_tasks, jnp.float32), recorded=jnp.zeros([], bool)
    )

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key, num_tasks
    initial = jnp.where(state.recorded, state.initial_losses, losses)
    return base.safe_reciprocal(initial), InitialLossState(initial, jnp.ones([], bool))

  return base.from_weighting(
    weighting,
    name="initial_loss",
    needs="nothing",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
