"""Fixed, user-given task weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base


def constant(weights: jax.typing.ArrayLike) -> base.BalancingTransformation:
  r"""Fixed task weights: :math:`d = \sum_t w_t g_t` with ``w`` given.

  Hand-tuned loss weights, the practice the adaptive methods replace. The
  weights may be traced (``optax.inject_hyperparams(mtgrad.constant)``), so
  they can be scheduled.

  Args:
    weights: ``[T]`` task weights; ``T`` is taken from their length.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its state records the weights.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.constant(jnp.array([1.0, 0.1]))
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}))[0]
    {'w': Array([1. , 0.2], dtype=float32)}

  References:
    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
    Losses*, CVPR 2018, section 1 (the cost of grid-searching such weights).
  """
  weights = jnp.asarray(weights)
  if weights.ndim != 1 or weights.shape[0] < 1:
    raise ValueError(
      f"mtgrad.constant: weights must have shape [T] with T >= 1, got shape {weights.shape}."
    )
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    weights = weights.astype(jnp.float32)

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, losses, key, num_tasks
    return weights, state

  return base.from_weighting(
    weighting, name="constant", needs="nothing", num_tasks=weights.shape[0]
  )
