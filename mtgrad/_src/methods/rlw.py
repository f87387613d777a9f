"""Random Loss Weighting."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base


def rlw(key: base.KeyLike, *, num_tasks: int | None = None) -> base.BalancingTransformation:
  r"""Random Loss Weighting: fresh random weights on the simplex every step.

  .. math::

     z \sim \mathcal{N}(0, I_T), \qquad w = \operatorname{softmax}(z),
     \qquad d = \sum_t w_t g_t .

  Args:
    key: PRNG key or int seed; the state splits it at every update, so the
      same key gives the same sequence of weights.
    num_tasks: ``T``; optional. Given, the state records the weights.

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.rlw(jax.random.key(0), num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> bool(jnp.allclose(updates["w"], state.weights))
    True
    >>> float(state.weights.sum())
    1.0

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022 (arXiv:2111.10603).
  """
  if key is None:
    raise ValueError("mtgrad.rlw needs a PRNG key (or an int seed).")

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, losses
    return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32)), state

  return base.from_weighting(weighting, name="rlw", needs="nothing", num_tasks=num_tasks, key=key)
