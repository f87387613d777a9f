"""Uncertainty weighting: learned homoscedastic task variances (Kendall et al. 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src.methods import _trainable

# |s| <= 80 keeps 0.5 exp(-s) inside float32 (about 1e-35 .. 1e34) when a loss
# stays at zero, where the objective drives s to -inf.
_MAX_LOG_VARIANCE = 80.0


class UncertaintyState(NamedTuple):
  """Weighting state of :func:`uncertainty` (``state.weighting_state``).

  Attributes:
    log_variances: the log-variances :math:`s` (``[T]``, init 0) and the
      state of their optimizer; ``value`` gives the weights of the *next*
      update, ``0.5 exp(-value)``.
  """

  log_variances: _trainable.Trainable


def uncertainty(
  learning_rate: float | jax.Array = 0.01,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""Uncertainty weighting: each loss scaled by a learned precision.

  Every task has a learned log-variance :math:`s_t = \log \sigma_t^2`
  (init 0), and the network and :math:`s` jointly minimise

  .. math::

     \mathcal{L}(\theta, s) = \sum_t \tfrac12 \bigl(e^{-s_t} L_t(\theta) + s_t\bigr),
     \qquad
     w_t = \tfrac12 e^{-s_t}, \qquad d = \sum_t w_t g_t ,

  so the update is the gradient of :math:`\mathcal{L}` in :math:`\theta`.
  The log-variances live in the state and take one step of their own
  optimizer per update along the closed-form gradient

  .. math::

     \frac{\partial \mathcal{L}}{\partial s_t} = \tfrac12 \bigl(1 - e^{-s_t} L_t\bigr),

  whose zero is :math:`s_t = \log L_t`: at fixed losses the weights
  converge to :math:`w_t = 1 / (2 L_t)`. Each update uses the weights
  *before* this step's update of :math:`s` (one joint gradient step on
  :math:`(\theta, s)`, as when :math:`s` sits among the model's
  parameters).

  Args:
    learning_rate: the learning rate of the default optimizer of :math:`s`,
      ``optax.adam(learning_rate)``. The default 0.01 moves :math:`s` by
      at most about 0.01 per step, so mini-batch noise in the losses moves
      the weights by a few percent only. At fixed losses the weights come
      within 10% of ``1 / (2 L_t)`` in about 600 steps for ``L_t = 0.01``
      and 3,000 for ``L_t = 100`` (Adam's second moment remembers the large
      first gradients of a large loss), and within 0.1% by 6,000 (tested).
      May be traced.
    optimizer: an optax optimizer for :math:`s` instead of
      ``optax.adam(learning_rate)`` (then ``learning_rate`` is unused).
    num_tasks: ``T`` (required: :math:`s` is kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; ``state.weighting_state`` is an :class:`UncertaintyState`.
    Its weights depend on the losses only, so
    :func:`mtgrad.weights_from_losses` gives them without task gradients.

  Example:
    >>> import jax, jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.uncertainty(num_tasks=2)
    >>> def step(state, _):  # fixed losses 4 and 1/4
    ...   weights, state = mtgrad.weights_from_losses(tx, state, jnp.array([4.0, 0.25]))
    ...   return state, weights
    >>> _, weights = jax.lax.scan(step, tx.init({"w": jnp.zeros(2)}), length=1000)
    >>> [round(float(w), 3) for w in weights[0]]  # 0.5 exp(-0) before any step
    [0.5, 0.5]
    >>> [round(float(w), 3) for w in weights[-1]]  # 1 / (2 L_t)
    [0.125, 2.0]

  References:
    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics*, CVPR 2018 (arXiv:1705.07115).

  Warning:
    The paper derives :math:`\frac{1}{2\sigma^2} L + \log \sigma` for
    regression (Gaussian likelihood) and :math:`\frac{1}{\sigma^2} L +
    \log \sigma` for classification (softmax with a temperature); this is
    the regression form for every task, as in common implementations. Both
    have the same fixed point :math:`w_t = 1 / (2 L_t)`; they differ in the
    initial weights (0.5 here, 1 for the classification form) and in the
    speed of :math:`s`. The paper trains :math:`s` with the network's
    optimizer; here it has its own (Adam by default). :math:`s` is clipped
    to ``[-80, 80]`` so that a loss that stays exactly zero (whose optimum is
    :math:`s = -\infty`) keeps finite weights. A NaN loss makes its task's
    weight NaN from this step on (not only from the next one, when
    :math:`s_t` has become NaN).
  """
  base.require_num_tasks(num_tasks, "uncertainty")
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"mtgrad.uncertainty: learning_rate must be > 0, got {learning_rate!r}.")
  opt = _trainable.resolve_optimizer(optimizer, optax.adam(learning_rate))

  def init_state(num_tasks):
    return UncertaintyState(_trainable.init(opt, jnp.zeros(num_tasks, jnp.float32)))

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key, num_tasks
    log_var = state.log_variances
    precision = jnp.exp(-log_var.value)
    weights = 0.5 * precision
    grad = 0.5 * (1 - precision * losses.astype(precision.dtype))
    stepped = _trainable.step(opt, log_var, grad)
    clipped = jnp.clip(stepped.value, -_MAX_LOG_VARIANCE, _MAX_LOG_VARIANCE)
    weights = jnp.where(jnp.isnan(losses), jnp.nan, weights)
    return weights, UncertaintyState(stepped._replace(value=clipped))

  return base.from_weighting(
    weighting,
    name="uncertainty",
    needs="nothing",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
