"""MetaBalance (He et al. 2022): auxiliary gradient magnitudes pulled toward the primary's."""

from __future__ import annotations

import operator
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree

Strategy = Literal["reduce", "enlarge", "both"]
_STRATEGIES = ("reduce", "enlarge", "both")


class MetaBalanceState(NamedTuple):
  """State of :func:`metabalance` (one per block: ``[B, T]`` per leaf).

  Attributes:
    norm_ema: ``[T]`` moving averages :math:`m_t` of the task gradient norms
      on the block (zeros at first, no bias correction).
  """

  norm_ema: jax.Array  # [T]


def primary_index(primary: int, method: str) -> int:
  """Validates a single primary task index (a static Python int)."""
  if isinstance(primary, bool):
    raise ValueError(f"mtgrad.{method}: primary must be a task index (int), got {primary!r}.")
  try:
    index = operator.index(primary)
  except TypeError:
    raise ValueError(
      f"mtgrad.{method}: primary must be one task index, a static Python int (with "
      f"optax.inject_hyperparams, name it in static_args), got {primary!r}."
    ) from None
  if index < 0:
    raise ValueError(f"mtgrad.{method}: primary must be >= 0, got {primary!r}.")
  return index


def check_primary_range(index: int, num_tasks: int, method: str) -> None:
  if index >= num_tasks:
    raise ValueError(
      f"mtgrad.{method}: primary={index} is out of range for T={num_tasks} tasks "
      f"(valid: 0..{num_tasks - 1})."
    )


def _check_unit_interval(value, name: str, upper_open: bool) -> None:
  # Only Python numbers are checked: traced values (inject_hyperparams) pass.
  number = isinstance(value, int | float) and not isinstance(value, bool)
  if number and not (0 <= value < 1 if upper_open else 0 <= value <= 1):
    interval = "[0, 1)" if upper_open else "[0, 1]"
    raise ValueError(f"mtgrad.metabalance: {name} must be in {interval}, got {value!r}.")


def metabalance(
  relax: jax.typing.ArrayLike = 0.7,
  beta: jax.typing.ArrayLike = 0.9,
  strategy: Strategy = "both",
  primary: int = 0,
  *,
  num_tasks: int | None = None,
  blocks: tree.Blocks = "leaf",
) -> base.BalancingTransformation:
  r"""MetaBalance: pull each auxiliary gradient's magnitude toward the primary's.

  Per block (by default every parameter tensor separately, "each part of
  the network") and per task, a moving average of the gradient norm

  .. math::

     m_t \leftarrow \beta\, m_t + (1 - \beta) \lVert g_t \rVert
     \qquad (m_t = 0 \text{ at first, no bias correction}),

  then, with :math:`p` the primary task, every auxiliary gradient is scaled

  .. math::

     w_t = 1 - r + r\, \frac{m_p}{m_t} \quad (t \ne p), \qquad w_p = 1,
     \qquad d = \sum_t w_t g_t ,

  so an auxiliary gradient of norm :math:`m_t` is moved to
  :math:`(1 - r)\, m_t + r\, m_p`: the relax factor :math:`r` sets how close
  to the primary's magnitude it lands (:math:`r = 1`: equal magnitudes).
  Strategy ``"reduce"`` rescales only the auxiliary gradients larger than
  the primary's (:math:`m_t > m_p`), ``"enlarge"`` only the smaller ones
  (:math:`m_t < m_p`), ``"both"`` all of them (the released code). The
  averages include the current step, as in the released code.

  Args:
    relax: the relax factor :math:`r` in ``[0, 1]`` (paper: tuned on
      validation data; 0.7 in the released code); may be traced
      (``optax.inject_hyperparams``).
    beta: moving-average rate in ``[0, 1)`` (0.9, as the paper); may be traced.
    strategy: ``"reduce"``, ``"enlarge"`` or ``"both"``, the paper's three
      strategies (chosen on validation data there).
    primary: index of the primary (target) task (a static Python int).
    num_tasks: ``T`` (required: the averages are per-task state).
    blocks: ``"leaf"`` (default, the paper: every parameter tensor), ``None``
      (the whole model as one block) or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its ``weights`` are ``[B, T]``
    (``[T]`` with ``blocks=None``) and its ``weighting_state`` a
    :class:`MetaBalanceState` per block.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.metabalance(relax=0.5, beta=0.5, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 4.0]])}  # auxiliary 4x larger
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"]  # auxiliary norm 4 -> 0.5 * 4 + 0.5 * 1
    Array([1. , 2.5], dtype=float32)
    >>> state.weighting_state.norm_ema  # (1 - beta) ||g_t||, a row per leaf
    Array([[0.5, 2. ]], dtype=float32)

  References:
    He, Feng, Cheng, Ji, Guo & Caverlee, *MetaBalance: Improving Multi-Task
    Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks*,
    WWW 2022 (arXiv:2203.06801); github.com/facebookresearch/MetaBalance.

  Warning:
    The released code divides by :math:`m_t` with no guard. Here a task
    whose average is still 0 on a block (its gradient there has been 0 so
    far, e.g. another task's head) keeps factor 1 instead of ``inf`` or
    ``NaN``; its gradient there is 0 anyway while ``beta < 1``.

  Warning:
    The paper applies MetaBalance to the shared parameters only. On a block
    where the primary gradient is zero (an auxiliary task's own head) the
    formula gives that auxiliary gradient the factor :math:`1 - r`; give the
    transform the shared parameters only (or ``strategy="enlarge"``, which
    leaves those blocks alone) to avoid it.
  """
  base.require_num_tasks(num_tasks, "metabalance")
  if strategy not in _STRATEGIES:
    raise ValueError(
      f"mtgrad.metabalance: strategy must be one of {_STRATEGIES}, got {strategy!r}."
    )
  index = primary_index(primary, "metabalance")
  check_primary_range(index, num_tasks, "metabalance")
  _check_unit_interval(relax, "relax", upper_open=False)
  _check_unit_interval(beta, "beta", upper_open=True)

  def init_state(num_tasks):
    return MetaBalanceState(norm_ema=jnp.zeros(num_tasks, jnp.float32))

  def weighting(sq_norms, losses, state, key, *, num_tasks):
    del losses, key
    norms = jnp.sqrt(jnp.maximum(sq_norms, 0))
    dtype = jnp.promote_types(norms.dtype, jnp.float32)
    norms = norms.astype(dtype)
    rate = jnp.asarray(beta, dtype)
    ema = rate * state.norm_ema.astype(dtype) + (1 - rate) * norms
    r = jnp.asarray(relax, dtype)
    primary_ema = ema[index]
    factor = 1 - r + r * primary_ema * base.safe_reciprocal(ema)
    if strategy == "reduce":
      rescale = ema > primary_ema
    elif strategy == "enlarge":
      rescale = ema < primary_ema
    else:
      rescale = jnp.ones(num_tasks, bool)
    # A NaN average keeps its NaN factor (never silently hidden).
    rescale = (rescale & (ema > 0)) | jnp.isnan(ema) | jnp.isnan(primary_ema)
    rescale = rescale & (jnp.arange(num_tasks) != index)
    weights = jnp.where(rescale, factor, 1)
    return weights, MetaBalanceState(norm_ema=ema)

  return base.from_weighting(
    weighting,
    name="metabalance",
    needs="sq_norms",
    num_tasks=num_tasks,
    init_state=init_state,
    blocks=blocks,
  )
