"""Mean of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp

from mtgrad._src import base


def mean(*, num_tasks: int | None = None) -> base.BalancingTransformation:
  r"""Mean of the task gradients: :math:`d = \frac{1}{T} \sum_t g_t`.

  The gradient of the mean loss; :func:`mtgrad.sum` divided by ``T``.

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.mean()
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}))[0]
    {'w': Array([0.5, 1. ], dtype=float32)}

  References:
    Lin & Zhang, *LibMTL: A Python Library for Multi-Task Learning*, JMLR 24
    (2023).
  """

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, losses, key
    return jnp.full(num_tasks, 1 / num_tasks, jnp.float32), state

  return base.from_weighting(weighting, name="mean", needs="nothing", num_tasks=num_tasks)
