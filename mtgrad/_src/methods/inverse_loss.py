"""Loss-normalised weighting: gradient of the sum of log-losses."""

from __future__ import annotations

from mtgrad._src import base


def inverse_loss(*, num_tasks: int | None = None) -> base.BalancingTransformation:
  r"""Weights :math:`w_t = 1 / L_t`: the gradient of :math:`\sum_t \log L_t`.

  .. math::

     d = \sum_t \frac{g_t}{L_t} = \nabla_\theta \sum_t \log L_t ,

  with the losses held constant (stop-gradient) in the weights. Rescaling a
  loss, :math:`L_t \to c_t L_t`, leaves the update unchanged (Su, part 1:
  the scale-invariant loss).

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.inverse_loss()
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> losses = jnp.array([2.0, 0.5])
    >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}), losses=losses)[0]
    {'w': Array([0.5, 2. ], dtype=float32)}

  References:
    Su Jianlin, *多任务学习漫谈（一）：以损失之名*,
    kexue.fm, 2022 (part 1 of the series; part 3 is kexue.fm/archives/8907).

  Warning:
    Meant for positive losses (the derivation takes their logarithm). A loss
    that is exactly zero gets weight 0 instead of ``1/0``.
  """

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key, num_tasks
    return base.safe_reciprocal(losses), state

  return base.from_weighting(
    weighting, name="inverse_loss", needs="nothing", needs_losses=True, num_tasks=num_tasks
  )
