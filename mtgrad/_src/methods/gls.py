"""Geometric loss strategy: the gradient of the geometric mean of the losses."""

from __future__ import annotations

import jax.numpy as jnp

from mtgrad._src import base


def gls(*, num_tasks: int | None = None) -> base.BalancingTransformation:
  r"""Geometric Loss Strategy: descend on the geometric mean of the losses.

  .. math::

     \mathcal{L} = \Bigl(\prod_t L_t\Bigr)^{1/T}, \qquad
     w_t = \frac{\partial \mathcal{L}}{\partial L_t}
         = \frac{(\prod_j L_j)^{1/T}}{T\, L_t}
         = \frac{1}{T} \exp\Bigl(\frac{1}{T} \sum_j \log L_j - \log L_t\Bigr),
     \qquad d = \sum_t w_t g_t ,

  with the losses held constant (stop-gradient) in the weights. The weights
  are computed in log space (the last form), so a product of many small or
  large losses neither underflows nor overflows. A task with a small loss
  gets a large weight, as with :func:`mtgrad.inverse_loss`; here the sum is
  rescaled by the geometric mean, so the direction of ``d`` does not depend
  on the scale of any loss but its length does.

  Args:
    num_tasks: ``T``; optional. Given, the state records the weights.

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``. Its weights depend on the losses only, so
    :func:`mtgrad.weights_from_losses` gives them without task gradients.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.gls(num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(
    ...   grads, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([4.0, 1.0]))
    >>> state.weights  # sqrt(4 * 1) / (2 * L_t)
    Array([0.25, 1.  ], dtype=float32)

  References:
    Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning*, CVPR Workshops 2019 (arXiv:1904.08492).

  Warning:
    Meant for positive losses (the geometric mean of a negative loss is
    undefined: it gives NaN weights). The gradient of the geometric mean is
    infinite for a task whose loss is exactly zero and zero for every other
    task; here that task's weight is 0 instead (as in
    :func:`mtgrad.inverse_loss`), so a zero loss gives the zero update, not
    the reference implementation's ``inf``/NaN.
  """

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key
    log_losses = jnp.log(losses.astype(jnp.promote_types(losses.dtype, jnp.float32)))
    log_weights = jnp.mean(log_losses) - log_losses
    # A zero loss gives -inf - (-inf) = NaN for its own task: weight 0 there.
    weights = jnp.where(losses == 0, 0, jnp.exp(log_weights) / num_tasks)
    return weights, state

  return base.from_weighting(
    weighting, name="gls", needs="nothing", needs_losses=True, num_tasks=num_tasks
  )
