"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al. 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods import _trainable

# Weights are clamped to at least this before the renormalisation to sum T,
# so that none reaches zero or below (the weights sum to T, so it is tiny).
_MIN_WEIGHT = 1e-6


class GradNormState(NamedTuple):
  """Weighting state of :func:`gradnorm` (``state.weighting_state``).

  Attributes:
    next_weights: the weights of the *next* update (``[T]``, init 1, sum
      ``T``) and the state of their optimizer. The weights of the last
      update are ``state.weights``.
    initial_losses: ``[T]`` the losses of the first update, :math:`L(0)`
      (zeros before it).
    recorded: whether ``initial_losses`` holds them yet.
  """

  next_weights: _trainable.Trainable
  initial_losses: jax.Array  # [T]
  recorded: jax.Array  # [] bool


def gradnorm(
  alpha: float | jax.Array = 1.5,
  learning_rate: float | jax.Array = 0.025,
  *,
  blocks: tree.Selection = None,
  optimizer: optax.GradientTransformation | None = None,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""GradNorm: learn the weights that equalise the tasks' gradient norms.

  The weights :math:`w` live in the state (init 1). At every update, on the
  parameters :math:`W` selected by ``blocks``,

  .. math::

     G_t = w_t \lVert g_t^W \rVert, \quad
     \bar G = \tfrac1T \sum_t G_t, \quad
     r_t = \frac{L_t / L_t(0)}{\tfrac1T \sum_j L_j / L_j(0)}, \quad
     L_\text{grad} = \sum_t \bigl\lvert G_t - \bar G\, r_t^{\alpha} \bigr\rvert ,

  with :math:`L(0)` the losses of the first update. The update is
  :math:`d = \sum_t w_t g_t` over *all* parameters with the weights
  :math:`w` of this step, before they learn (as in the paper's Algorithm 1,
  where :math:`W` and :math:`w` step from the same point). Then, holding
  the targets :math:`\bar G r_t^\alpha` constant,

  .. math::

     \frac{\partial L_\text{grad}}{\partial w_t}
       = \operatorname{sign}\bigl(G_t - \bar G r_t^\alpha\bigr) \lVert g_t^W \rVert

  (closed form, no second-order autodiff) takes one step of the weights'
  own optimizer; the result is clamped to at least ``1e-6`` and rescaled so
  that :math:`\sum_t w_t = T`: the weights of the next update. Tasks that
  train slower than average (:math:`r_t > 1`) get larger gradients;
  :math:`\alpha` sets how strongly (``alpha=0``: equal gradient norms on
  :math:`W`). Only the squared norms :math:`\lVert g_t^W \rVert^2` (the
  Gram diagonal on :math:`W`) are computed, not the Gram matrix.

  Args:
    alpha: the asymmetry :math:`\alpha \ge 0`. The paper uses 0.12 on its
      synthetic regression and 1.5 on NYUv2 (the default). May be traced.
    learning_rate: the learning rate of the default optimizer of the
      weights, ``optax.adam(learning_rate)``. With the default 0.025 the
      weights move by about 0.025 per step: on the paper's synthetic
      regression (two tasks, output scales 1 and 100, ``alpha=0.12``) the
      small task's weight passes 1 at the first step and averages about 1.8
      after the first hundred, bringing the weighted gradient norms on the
      last shared layer together (tested). May be traced.
    blocks: the parameters :math:`W` on which the gradient norms are
      measured: ``None`` (default: every leaf the transform sees), a pytree
      of bools with the params structure, a callable ``(path, leaf) ->
      bool`` called on every leaf (``leaf`` is a ``jax.ShapeDtypeStruct``
      without the task axis; ``path`` as in
      :func:`jax.tree_util.tree_map_with_path`), or a callable ``params ->
      pytree of bools`` (the tree-level form of :func:`mtgrad.block_ids`
      and :func:`optax.masked`). The paper uses the last shared layer. The
      update always combines every leaf.
    optimizer: an optax optimizer for the weights instead of
      ``optax.adam(learning_rate)`` (then ``learning_rate`` is unused).
    num_tasks: ``T`` (required: the weights are kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``. Its state is a :class:`mtgrad.BalancingState` whose
    ``weights`` are those of the last update and whose ``weighting_state``
    is a :class:`GradNormState`.

  Raises:
    ValueError: for a ``blocks`` selection that selects nothing, lacks the
      params structure or holds non-bool labels; and from
      :func:`mtgrad.weights_from_losses`, since the weights depend on the
      task gradients.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.gradnorm(alpha=0.0, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[10.0, 0.0], [0.0, 1.0]])}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update(grads, state, params, losses=jnp.array([1.0, 1.0]))
    ...   print([round(float(w), 3) for w in state.weights])
    [1.0, 1.0]
    [0.975, 1.025]
    [0.95, 1.05]

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks*,
    ICML 2018 (arXiv:1711.02257), Algorithm 1.

  Warning:
    The paper does not name the optimizer of the weights; the default here
    is Adam at 0.025, as in common reimplementations. The
    paper only renormalises the weights to sum to ``T``; the clamp to
    ``1e-6`` before it keeps them positive. :math:`L(0)` is the loss of the
    first update (the paper's :math:`L_i(0)`; it mentions
    :math:`\log C` for ``C``-way classification as an alternative). A zero
    :math:`L_t(0)` gives :math:`L_t / L_t(0) := 0`, and a zero mean ratio
    gives :math:`r = 0`, instead of dividing by zero. A NaN loss makes this
    step's weights NaN (it would poison the weights of every later step
    anyway).
  """
  base.require_num_tasks(num_tasks, "gradnorm")
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"mtgrad.gradnorm: num_tasks must be a positive int, got {num_tasks!r}.")
  if isinstance(alpha, (int, float)) and not alpha >= 0:
    raise ValueError(f"mtgrad.gradnorm: alpha must be >= 0, got {alpha!r}.")
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"mtgrad.gradnorm: learning_rate must be > 0, got {learning_rate!r}.")
  opt = _trainable.resolve_optimizer(optimizer, optax.adam(learning_rate))

  def init_state(num_tasks):
    return GradNormState(
      next_weights=_trainable.init(opt, jnp.ones(num_tasks, jnp.float32)),
      initial_losses=jnp.zeros(num_tasks, jnp.float32),
      recorded=jnp.zeros([], bool),
    )

  def weighting(sq_norms, losses, state: GradNormState, key, *, num_tasks):
    del key
    acc = state.initial_losses.dtype
    losses = losses.astype(acc)
    weights = state.next_weights.value
    initial = jnp.where(state.recorded, state.initial_losses, losses)
    norms = jnp.sqrt(sq_norms.astype(acc))
    weighted_norms = weights * norms
    loss_ratios = losses * base.safe_reciprocal(initial)
    relative_rates = loss_ratios * base.safe_reciprocal(jnp.mean(loss_ratios))
    targets = jnp.mean(weighted_norms) * relative_rates**alpha
    grad = jnp.sign(weighted_norms - targets) * norms
    stepped = _trainable.step(opt, state.next_weights, grad)
    positive = jnp.maximum(stepped.value, _MIN_WEIGHT)
    renormalised = num_tasks * positive / jnp.sum(positive)
    weights = jnp.where(jnp.any(jnp.isnan(losses)), jnp.nan, weights)
    return weights, GradNormState(stepped._replace(value=renormalised), initial, jnp.ones([], bool))

  return base.from_weighting(
    weighting,
    name="gradnorm",
    needs="sq_norms",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
    measure_on=blocks,
  )
