"""Equal weighting: the plain sum of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp

from mtgrad._src import base


def sum(*, num_tasks: int | None = None) -> base.BalancingTransformation:  # noqa: A001
  r"""Equal weighting: :math:`d = \sum_t g_t`, i.e. :math:`w = \mathbf{1}`.

  The gradient of the summed loss :math:`\sum_t L_t` ("EW", equal weighting,
  in LibMTL): the baseline every other method is compared with.

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.sum()
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}))[0]
    {'w': Array([1., 2.], dtype=float32)}

  References:
    Lin & Zhang, *LibMTL: A Python Library for Multi-Task Learning*, JMLR 24
    (2023).
  """

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, losses, key
    return jnp.ones(num_tasks, jnp.float32), state

  return base.from_weighting(weighting, name="sum", needs="nothing", num_tasks=num_tasks)
