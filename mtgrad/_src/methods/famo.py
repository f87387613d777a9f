"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023)."""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src.methods import _trainable

# The reference's offset inside every logarithm: log(L - L_min + eps).
_EPS = 1e-8

Protocol = Literal["auto", "exact", "lagged"]


def _task_sum(x: jax.Array) -> jax.Array:
  # Sums over tasks in sorted order, so that the rounding, and with it every
  # later step, does not depend on the order of the tasks: Adam normalises
  # the logit gradient, so a gradient at rounding level (all losses falling
  # by the same factor) still moves the logits by about the learning rate.
  return jnp.sum(jnp.sort(x))


def _softmax(logits: jax.Array) -> jax.Array:
  shifted = jnp.exp(logits - jnp.max(logits))
  return shifted / _task_sum(shifted)


class FAMOState(NamedTuple):
  """Weighting state of :func:`famo` (``state.weighting_state``).

  Attributes:
    logits: the task logits :math:`\\xi` (``[T]`` float32, init 0) and
      their optimizer's state; the task distribution is
      ``softmax(logits.value)``.
    previous_losses: ``[T]`` the losses of the last update (the "before"
      side of the next logit step).
    has_previous: whether ``previous_losses`` holds losses yet (bool); the
      logits do not move before it does.
  """

  logits: _trainable.Trainable
  previous_losses: jax.Array  # [T]
  has_previous: jax.Array  # [] bool


def famo(
  learning_rate: float | jax.Array = 0.025,
  weight_decay: float | jax.Array = 1e-3,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_tasks: int | None = None,
  protocol: Protocol = "auto",
  min_losses: jax.typing.ArrayLike | None = None,
) -> base.BalancingTransformation:
  r"""FAMO: weights that equalise the rate at which every task loss decreases.

  FAMO keeps task logits :math:`\xi` (init 0), :math:`z = \operatorname{softmax}(\xi)`,
  and descends on :math:`\sum_t z_t \log(L_t - L^*_t + \epsilon)` with the
  normalisation :math:`c = \sum_j z_j / (L_j - L^*_j + \epsilon)` held
  constant:

  .. math::

     w_t = \frac{z_t / (L_t - L^*_t + \epsilon)}
                {\sum_j z_j / (L_j - L^*_j + \epsilon)},
     \qquad d = \sum_t w_t g_t ,

  with ``min_losses`` :math:`L^*` (default 0) and :math:`\epsilon = 10^{-8}`
  as in the reference. After the model step the logits learn from how much
  each log-loss decreased,
  :math:`\delta_t = \log(L_t^{\text{before}} - L^*_t + \epsilon) -
  \log(L_t^{\text{after}} - L^*_t + \epsilon)`: their gradient is
  :math:`J_z^\top \delta = (\operatorname{diag} z - z z^\top)\,\delta`, and
  the optimizer *descends* along it (tasks that improved more than average
  lose weight). The default optimizer is the reference's
  ``torch.optim.Adam(lr=learning_rate, weight_decay=weight_decay)``, an L2
  term added to the gradient before Adam:
  ``optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))``.

  **The two protocols.** The reference measures :math:`L^{\text{after}}` on
  the *same* batch after the model step (one extra forward pass). Within an
  optax chain the transform sees one call per step, so the logit step of
  update ``k`` runs at the start of update ``k + 1``, which the next weights
  are the first to use (the same numbers as the reference's order):

  - ``protocol="exact"`` (the paper's): every ``update`` call takes
    ``post_step_losses=``, the previous call's batch re-evaluated at the
    current params (the params the previous update produced). At the first
    call there is no previous step: pass any ``[T]`` array (e.g. the current
    losses); it is ignored. ``optax.chain`` forwards the keyword::

      prev_batch = batch_0
      for batch in batches:
        post = task_losses(params, prev_batch)      # last step's batch, new params
        losses, grads = mtgrad.value_and_jacobian(task_losses)(params, batch)
        updates, state = tx.update(grads, state, params, losses=losses,
                                   post_step_losses=post)
        params = optax.apply_updates(params, updates)
        prev_batch = batch

  - ``protocol="lagged"`` (a deviation, see the warning): no extra forward
    pass; :math:`L^{\text{after}}` of step ``k`` is the loss of step
    ``k + 1`` on its own batch, so ``update(grads, state, params,
    losses=losses)`` alone suffices.

  - ``protocol="auto"`` (default): the exact protocol in every ``update``
    call that passes ``post_step_losses=``, the lagged one in a call that
    does not (so ``update(..., losses=losses)`` alone works, as for every
    other method, and is the labelled approximation). Choose ``"exact"`` to
    make a missing ``post_step_losses`` an error instead.

  Sums over tasks run in sorted order, so the result does not depend on the
  order of the tasks bit for bit: Adam normalises the logit gradient, so
  even a gradient at rounding level (every loss falling by the same factor)
  moves the logits by about the learning rate, and a rounding difference
  would grow into a different run.

  Args:
    learning_rate: learning rate of the default logit optimizer (ignored when
      ``optimizer`` is given); the reference's 0.025.
    weight_decay: L2 coefficient :math:`\gamma` of the default optimizer
      (ignored when ``optimizer`` is given). LibMTL's default 1e-3; the
      reference code defaults to 0.01 and its run scripts use 1e-3 (QM9) or
      1e-2 (CelebA).
    optimizer: the optax optimizer of the logits (descends on the gradient
      above).
    num_tasks: ``T`` (required: the logits are kept in the state).
    protocol: ``"auto"`` (exact when ``post_step_losses=`` is passed,
      lagged otherwise), ``"exact"`` (``update`` requires
      ``post_step_losses=``) or ``"lagged"`` (the one-step-lag approximation;
      ``post_step_losses`` is an error).
    min_losses: ``[T]`` lower bounds :math:`L^*` of the losses (the
      reference's ``set_min_losses``); default 0.

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=``
    (``[T]``) in ``update``, and ``post_step_losses=`` (``[T]``) for the
    exact protocol; its ``weighting_state`` is a :class:`FAMOState`.
    The weights depend on the losses only, so :func:`mtgrad.weights_from_losses`
    gives them without the stacked task gradients (it forwards
    ``post_step_losses=`` too).

  Raises:
    ValueError: at trace time, when ``post_step_losses`` is missing with
      ``protocol="exact"``, given with ``protocol="lagged"``, or not a
      floating ``[T]`` array.

  Example:
    Two tasks on one parameter vector, the exact protocol with one batch:

    >>> import jax, jax.numpy as jnp, optax, mtgrad
    >>> def task_losses(params, batch):
    ...   return jnp.stack([jnp.sum((params["w"] - batch) ** 2), jnp.sum(params["w"] ** 2) + 1])
    >>> tx = optax.chain(mtgrad.famo(num_tasks=2, protocol="exact"), optax.sgd(0.1))
    >>> params, batch = {"w": jnp.array([1.0, -2.0])}, jnp.array([3.0, 0.0])
    >>> state, prev_batch = tx.init(params), batch
    >>> for _ in range(3):
    ...   post = task_losses(params, prev_batch)
    ...   losses, grads = mtgrad.value_and_jacobian(task_losses)(params, batch)
    ...   updates, state = tx.update(grads, state, params, losses=losses, post_step_losses=post)
    ...   params, prev_batch = optax.apply_updates(params, updates), batch
    >>> optax.tree.get(state, "weights")
    Array([0.44395325, 0.5560467 ], dtype=float32)
    >>> tx.update(grads, state, params, losses=losses)
    Traceback (most recent call last):
    ...
    ValueError: mtgrad.famo(protocol='exact') needs post_step_losses=...

  References:
    Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*,
    NeurIPS 2023 (arXiv:2306.03792); reference code
    github.com/Cranial-XIX/FAMO (``famo.py``).

  Warning:
    ``protocol="lagged"``, and ``"auto"`` in a call without
    ``post_step_losses``, is not the paper's algorithm: it compares losses
    of two different batches at two different params, so batch-to-batch
    noise enters :math:`\delta` (the exact protocol compares one batch
    before and after the step). The reference also clips the shared
    parameters' gradient norm to ``max_norm=1`` after its backward pass;
    that is not part of this transform (chain
    ``optax.clip_by_global_norm(1.0)`` after it). A loss below its
    ``min_losses`` gets a negative weight and turns the logits into NaN at
    the next logit step (the logarithm of a negative gap), as in the
    reference; a loss equal to its bound is finite through
    :math:`\epsilon`.
  """
  base.require_num_tasks(num_tasks, "famo")
  if protocol not in ("auto", "exact", "lagged"):
    raise ValueError(
      f"mtgrad.famo: protocol must be 'auto', 'exact' or 'lagged', got {protocol!r}."
    )
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"mtgrad.famo: learning_rate must be > 0, got {learning_rate!r}.")
  if isinstance(weight_decay, (int, float)) and not weight_decay >= 0:
    raise ValueError(f"mtgrad.famo: weight_decay must be >= 0, got {weight_decay!r}.")
  opt = _trainable.resolve_optimizer(
    optimizer, optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
  )
  if min_losses is None:
    lower = jnp.zeros(num_tasks, jnp.float32)
  else:
    lower = jnp.asarray(min_losses, jnp.float32)
    if lower.shape != (num_tasks,):
      raise ValueError(
        f"mtgrad.famo: min_losses must have shape ({num_tasks},), got {lower.shape}."
      )

  def log_gap(losses):
    return jnp.log(losses.astype(jnp.float32) - lower + _EPS)

  def learn(state: FAMOState, losses_after: jax.Array) -> FAMOState:
    # The logit step of the update that produced state.previous_losses.
    delta = log_gap(state.previous_losses) - log_gap(losses_after)
    z = _softmax(state.logits.value)
    grad = z * delta - z * _task_sum(z * delta)  # (diag z - z z^T) delta
    stepped = _trainable.step(opt, state.logits, grad)
    logits = jax.tree.map(
      lambda new, old: jnp.where(state.has_previous, new, old), stepped, state.logits
    )
    return state._replace(logits=logits)

  def init_state(num_tasks):
    return FAMOState(
      logits=_trainable.init(opt, jnp.zeros(num_tasks, jnp.float32)),
      previous_losses=jnp.zeros(num_tasks, jnp.float32),
      has_previous=jnp.zeros([], bool),
    )

  def make_inner(lagged: bool) -> base.BalancingTransformation:
    def weighting(gram, losses, state, key, *, num_tasks):
      del gram, key, num_tasks
      if lagged:
        state = learn(state, losses)
      share = _softmax(state.logits.value) / (losses.astype(jnp.float32) - lower + _EPS)
      weights = share / _task_sum(share)
      return weights, FAMOState(state.logits, losses.astype(jnp.float32), jnp.ones([], bool))

    return base.from_weighting(
      weighting,
      name="famo",
      needs="nothing",
      needs_losses=True,
      num_tasks=num_tasks,
      init_state=init_state,
    )

  # Both share one state layout; which one runs is decided at trace time.
  exact_inner, lagged_inner = make_inner(lagged=False), make_inner(lagged=True)

  def update_fn(
    task_grads: Any,
    state: base.BalancingState,
    params: Any = None,
    *,
    losses: jax.Array | None = None,
    post_step_losses: jax.Array | None = None,
    **extra_args: Any,
  ):
    if protocol == "exact" and post_step_losses is None:
      raise ValueError(
        "mtgrad.famo(protocol='exact') needs post_step_losses=, the previous update's "
        "batch re-evaluated at the current params (any [T] array at the first update), in "
        "every update call; or build it with protocol='lagged' to use the next batch's "
        "losses instead (a one-step-lag approximation)."
      )
    if protocol == "lagged" and post_step_losses is not None:
      raise ValueError(
        "mtgrad.famo(protocol='lagged') learns from the next update's losses and takes no "
        "post_step_losses; build it with protocol='exact' (or 'auto') to use them."
      )
    if post_step_losses is None:
      return lagged_inner.update(task_grads, state, params, losses=losses, **extra_args)
    post = jnp.asarray(post_step_losses)
    if post.shape != (num_tasks,) or not jnp.issubdtype(post.dtype, jnp.floating):
      raise ValueError(
        f"mtgrad.famo: post_step_losses must be a floating array of shape ({num_tasks},), "
        f"got {post.dtype} of shape {post.shape}."
      )
    state = state._replace(weighting_state=learn(state.weighting_state, post))
    return exact_inner.update(task_grads, state, params, losses=losses, **extra_args)

  return base.BalancingTransformation(exact_inner.init, update_fn)
