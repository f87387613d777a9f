"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base


class DWAState(NamedTuple):
  """Weighting state of :func:`dwa` (``state.weighting_state``).

  Attributes:
    window_sum: ``[T]`` the sum of the losses seen in the current window.
    window_count: steps seen in the current window (int32).
    previous: ``[T]`` the mean loss of the last completed window,
      :math:`\\bar L(k-1)`.
    before_previous: ``[T]`` the mean loss of the window before it,
      :math:`\\bar L(k-2)`.
    completed: completed windows so far, saturating at 2 (int32).
  """

  window_sum: jax.Array  # [T]
  window_count: jax.Array  # [] int32
  previous: jax.Array  # [T]
  before_previous: jax.Array  # [T]
  completed: jax.Array  # [] int32


def dwa(
  temperature: float | jax.Array = 2.0,
  *,
  window: int = 100,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""Dynamic Weight Average: weight each task by how slowly its loss falls.

  The training steps are cut into consecutive windows of ``window`` steps;
  :math:`\bar L_t(k)` is task ``t``'s mean loss over window ``k``. During
  window ``k``,

  .. math::

     r_t = \frac{\bar L_t(k-1)}{\bar L_t(k-2)}, \qquad
     w_t = T\,\frac{\exp(r_t / \tau)}{\sum_j \exp(r_j / \tau)}, \qquad
     d = \sum_t w_t g_t ,

  and :math:`w = 1` during the first two windows (before two means exist).
  A task whose loss fell less over the last window (larger :math:`r_t`)
  gets more weight; the temperature :math:`\tau` smooths the weights
  (:math:`\tau \to \infty` gives :math:`w = 1`). The weights change only
  when a window completes.

  Args:
    temperature: :math:`\tau > 0`; default 2 as in the paper. May be traced.
    window: the number of steps whose losses are averaged (a Python int
      ``>= 1``). The paper averages over epochs; ``window=1`` is
      per-iteration DWA (:math:`r_t = L_t(k-1)/L_t(k-2)`). The default 100
      averages out most of the mini-batch noise of a single loss (the ratio
      of two single-batch losses is mostly noise) while the weights still
      adapt every hundred steps; the paper's epochs had a few hundred
      iterations (MTAN: NYUv2, CityScapes). Set it to your epoch length to
      reproduce the paper.
    num_tasks: ``T`` (required: the window means are kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; ``state.weighting_state`` is a :class:`DWAState`. Its
    weights depend on the losses only, so :func:`mtgrad.weights_from_losses`
    gives them without task gradients.

  Example:
    Per-iteration DWA; at the third step :math:`r = (0.5/1, 1/1)`, so
    :math:`w = 2 \operatorname{softmax}(r / 2)`:

    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.dwa(num_tasks=2, window=1)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for losses in ([1.0, 1.0], [0.5, 1.0], [0.5, 1.0]):
    ...   weights, state = mtgrad.weights_from_losses(tx, state, jnp.array(losses))
    ...   print([round(float(w), 4) for w in weights])
    [1.0, 1.0]
    [1.0, 1.0]
    [0.8756, 1.1244]

  References:
    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*,
    CVPR 2019 (arXiv:1803.10704), section 3.3.

  Warning:
    The paper averages the losses over each epoch; here the windows are a
    fixed number of steps (``window``), so the state has a fixed shape and
    the method runs inside ``jit`` / ``lax.scan`` with no notion of epochs.
    Meant for positive losses; a window mean of exactly zero gives
    :math:`r_t = 1` instead of dividing by zero. A NaN loss makes this
    step's weights NaN (it would poison the window means anyway).
  """
  base.require_num_tasks(num_tasks, "dwa")
  try:
    window = operator.index(window)
  except TypeError:
    raise ValueError(f"mtgrad.dwa: window must be an int >= 1, got {window!r}.") from None
  if window < 1:
    raise ValueError(f"mtgrad.dwa: window must be an int >= 1, got {window!r}.")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"mtgrad.dwa: temperature must be > 0, got {temperature!r}.")

  def init_state(num_tasks):
    zeros = jnp.zeros(num_tasks, jnp.float32)
    count = jnp.zeros([], jnp.int32)
    return DWAState(zeros, count, zeros, zeros, count)

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key
    ratio = jnp.where(state.before_previous == 0, 1, state.previous / state.before_previous)  # [T]
    weights = num_tasks * jax.nn.softmax(ratio / temperature)
    weights = jnp.where(state.completed >= 2, weights, jnp.ones_like(weights))
    weights = jnp.where(jnp.any(jnp.isnan(losses)), jnp.nan, weights)

    window_sum = state.window_sum + losses.astype(state.window_sum.dtype)
    window_count = state.window_count + 1
    full = window_count == window
    new_state = DWAState(
      window_sum=jnp.where(full, 0, window_sum),
      window_count=jnp.where(full, 0, window_count),
      previous=jnp.where(full, window_sum / window, state.previous),
      before_previous=jnp.where(full, state.previous, state.before_previous),
      completed=jnp.where(full, jnp.minimum(state.completed + 1, 2), state.completed),
    )
    return weights, new_state

  return base.from_weighting(
    weighting,
    name="dwa",
    needs="nothing",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
