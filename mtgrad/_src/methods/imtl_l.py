"""IMTL-L: the loss part of Impartial Multi-Task Learning (Liu et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src.methods import _trainable


class IMTLLState(NamedTuple):
  """Weighting state of :func:`imtl_l` (``state.weighting_state``).

  Attributes:
    log_scales: the trainable ``s`` (``[T]`` float32, init 0; the loss
      scales are :math:`e^{s_t}`) and its optimizer's state.
  """

  log_scales: _trainable.Trainable


def check_learning_rate(method: str, learning_rate) -> None:
  """Raises for a Python-number learning rate that is not positive (traced ones pass)."""
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"mtgrad.{method}: learning_rate must be > 0, got {learning_rate!r}.")


def default_optimizer(learning_rate: float | jax.Array) -> optax.GradientTransformation:
  """Adam on ``s``, the optimizer IMTL-L and IMTL use unless given one."""
  return optax.adam(learning_rate)


def init_log_scales(
  optimizer: optax.GradientTransformation, num_tasks: int
) -> _trainable.Trainable:
  """``s = 0`` (unit loss scales) and a fresh optimizer state."""
  return _trainable.init(optimizer, jnp.zeros(num_tasks, jnp.float32))


def loss_scales_step(
  optimizer: optax.GradientTransformation, log_scales: _trainable.Trainable, losses: jax.Array
) -> tuple[jax.Array, _trainable.Trainable]:
  """The loss scales of this step and ``s`` after one step on the IMTL-L loss.

  Returns ``exp(s)`` (NaN where a loss is NaN, so a broken loss is never
  hidden behind a scale that does not depend on it) and ``s`` stepped along
  :math:`\\partial_{s_t} (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1`.
  """
  losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
  scales = jnp.exp(log_scales.value)
  grad = (scales * losses - 1).astype(log_scales.value.dtype)
  scales = jnp.where(jnp.isnan(losses), jnp.nan, scales)
  return scales, _trainable.step(optimizer, log_scales, grad)


def imtl_l(
  learning_rate: float | jax.Array = 0.025,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""IMTL-L: learned loss scales that keep the scaled losses near 1.

  Each task loss is scaled by a learned :math:`e^{s_t}` (``s`` in the state,
  init 0) and the scales minimise

  .. math::

     \sum_t \left(e^{s_t} L_t - s_t\right), \qquad
     \frac{\partial}{\partial s_t} = e^{s_t} L_t - 1, \qquad
     d = \sum_t e^{s_t} g_t ,

  whose minimiser :math:`s_t = -\log L_t` makes every scaled loss equal to 1
  (the ``-s_t`` term stops the trivial :math:`s \to -\infty`). The update of
  a step uses the scales *before* that step's update of ``s``, as when ``s``
  and the model are trained jointly (the paper's Algorithm 1): the weights of
  the first step are 1. ``s`` is updated inside ``update`` with its own
  optimizer from the closed-form gradient above. At fixed losses the weights
  converge to :math:`1/L_t`, the gradient of :math:`\sum_t \log L_t`
  (:func:`mtgrad.inverse_loss`); while the losses move they follow them with
  the lag the optimizer allows.

  Default optimizer: ``optax.adam(learning_rate)`` with
  ``learning_rate=0.025``, the learning rate the FAMO and Nash-MTL code use
  for per-task loss-weight parameters (there for uncertainty weighting, whose
  log-variances are the same kind of parameter). At fixed losses spanning
  four decades (0.01 to 100) the weights are within 2% of :math:`1/L_t`
  after 2,000 steps and within 1e-4 after 3,000 (tested); losses within a
  decade of 1 take a few hundred steps. Adam's step is about
  ``learning_rate`` whatever the loss scale, which plain SGD on this
  gradient (curvature :math:`e^{s_t} L_t`) is not.

  Args:
    learning_rate: learning rate of the default optimizer (ignored when
      ``optimizer`` is given).
    optimizer: the optax optimizer of ``s``; default
      ``optax.adam(learning_rate)``.
    num_tasks: ``T`` (required: ``s`` is kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; its ``weighting_state`` is an :class:`IMTLLState`. The
    weights depend on the losses only, so :func:`mtgrad.weights_from_losses`
    gives them without the stacked task gradients.

  Example:
    >>> import jax, jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.imtl_l(num_tasks=2)
    >>> losses = jnp.array([4.0, 0.25])  # held fixed
    >>> step = lambda i, state: mtgrad.weights_from_losses(tx, state, losses)[1]
    >>> state = jax.lax.fori_loop(0, 1000, step, tx.init({"w": jnp.zeros(2)}))
    >>> state.weights.round(3)  # 1 / L
    Array([0.25, 4.  ], dtype=float32)

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021 (openreview.net/forum?id=IMPnRXEWpvr),
    Section 3.2.

  Warning:
    The paper applies the scaled losses to the task-specific parameters
    (and, in its hybrid :func:`mtgrad.imtl`, through IMTL-G to the shared
    ones) and trains ``s`` with the network's optimizer; here the scales
    weight whatever task gradients are given and ``s`` has its own
    optimizer (default above). A loss that stays exactly 0 has no
    minimiser in ``s``: ``s`` grows by about ``learning_rate`` per step and
    the scale overflows float32 after about ``88 / learning_rate`` such
    steps. A NaN loss gives a NaN weight.
  """
  base.require_num_tasks(num_tasks, "imtl_l")
  check_learning_rate("imtl_l", learning_rate)
  opt = _trainable.resolve_optimizer(optimizer, default_optimizer(learning_rate))

  def init_state(num_tasks):
    return IMTLLState(log_scales=init_log_scales(opt, num_tasks))

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key, num_tasks
    weights, log_scales = loss_scales_step(opt, state.log_scales, losses)
    return weights, IMTLLState(log_scales=log_scales)

  return base.from_weighting(
    weighting,
    name="imtl_l",
    needs="nothing",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
