"""The transform contract and the builder that turns a weighting into it.

A *weighting* is a pure function on small arrays::

    weighting(gram, losses, state, key, *, num_tasks) -> (weights [T], state)

where ``gram`` is what the weighting asked for (``needs``): the ``[T, T]``
Gram matrix (``"gram"``), the ``[T]`` squared norms (``"sq_norms"``) or
``None`` (``"nothing"``). :func:`from_weighting` wraps it into a
:class:`BalancingTransformation`: Gram pass, weighting, combine pass; globally
or block-wise (the weighting ``vmap``-ed over per-block Grams, with per-block
state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from mtgrad._src import tree

Needs = Literal["gram", "sq_norms", "nothing"]
KeyLike = jax.Array | int


class BalancingTransformation(aggregating.Aggregator):
  """An optax transformation from per-task gradients to one update.

  ``init(params)`` takes plain params (no task axis). ``update(task_grads,
  state, params=None, *, losses=None, **extra_args)`` takes the params pytree
  with a leading task axis ``T`` on every leaf and returns an update with
  exactly the params structure, leaf shapes and dtypes. It is an
  :class:`optax.experimental.aggregating.Aggregator` (so a
  :class:`optax.GradientTransformationExtraArgs`): put it first in an
  :func:`optax.chain`, which forwards ``losses=`` to it.
  """


class WeightingFn(Protocol):
  """``(gram, losses, state, key, *, num_tasks) -> (weights [T], state)``.

  ``num_tasks`` is the static task count ``T`` (a Python int), so weightings
  that need neither Gram nor losses still know the shape of their output.
  """

  def __call__(
    self,
    gram: jax.Array | None,
    losses: jax.Array | None,
    state: Any,
    key: jax.Array | None,
    *,
    num_tasks: int,
  ) -> tuple[jax.Array, Any]: ...


class BalancingState(NamedTuple):
  """State of a transform built by :func:`from_weighting`.

  Attributes:
    count: number of updates so far (int32).
    weights: the weights of the last update, ``[T]`` (``[B, T]`` block-wise);
      zeros before the first update; ``None`` when the transform was built
      without ``num_tasks``.
    key: the PRNG key, split at every update; ``None`` for deterministic
      methods.
    weighting_state: the weighting's own state (``()`` when it has none),
      one per block when block-wise.
  """

  count: jax.Array  # [] int32
  weights: jax.Array | None  # [T] or [B, T]
  key: jax.Array | None
  weighting_state: Any


def as_key(key: KeyLike | None) -> jax.Array | None:
  """Accepts an int seed, a typed key or a raw ``uint32[2]`` key."""
  if key is None:
    return None
  if isinstance(key, int):
    return jax.random.key(key)
  return jnp.asarray(key) if not isinstance(key, jax.Array) else key


def check_losses(losses: Any, num_tasks: int, method: str) -> jax.Array:
  """Validates ``losses`` for a loss-driven method; returns them as an array."""
  if losses is None:
    raise ValueError(
      f"mtgrad.{method} needs the per-task losses: call "
      f"update(task_grads, state, params, losses=losses) with losses of "
      f"shape ({num_tasks},)."
    )
  losses = jnp.asarray(losses)
  if losses.shape != (num_tasks,):
    raise ValueError(
      f"mtgrad.{method}: expected losses of shape ({num_tasks},) for "
      f"T={num_tasks} tasks, got shape {losses.shape}."
    )
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise ValueError(f"mtgrad.{method}: losses must be floating point, got {losses.dtype}.")
  return losses


class LossesOnly:
  """Stands in for the task gradients in :func:`weights_from_losses`.

  Transforms whose weights depend on the losses alone compute them from this
  placeholder without any gradient; every other transform raises on it.
  """

  def __init__(self, num_tasks: int):
    self.num_tasks = num_tasks


def check_task_grads(task_grads: Any, params: Any, num_tasks: int | None, method: str) -> int:
  """Validates the task gradients of an ``update`` call; returns ``T``.

  Every leaf must share a leading task axis (and match ``params`` plus that
  axis when ``params`` is given), and ``T`` must equal ``num_tasks`` when
  the transform was built with it. Raises ``ValueError`` at trace time.
  """
  if isinstance(task_grads, LossesOnly):
    raise ValueError(
      f"mtgrad.{method} computes its update from the task gradients, so it has no "
      "single-backward path: pass the stacked task gradients to update()."
    )
  t = tree.num_tasks(task_grads)
  if num_tasks is not None and t != num_tasks:
    raise ValueError(
      f"mtgrad.{method} was built with num_tasks={num_tasks} but the task "
      f"gradients have T={t} on their leading axis."
    )
  if params is not None:
    tree.check_matches_params(task_grads, params)
  return t


def require_num_tasks(num_tasks: int | None, method: str) -> int:
  """Raises unless ``num_tasks`` is given, for methods with per-task state."""
  if num_tasks is None:
    raise ValueError(f"mtgrad.{method} keeps per-task state and needs num_tasks=T at construction.")
  return num_tasks


def safe_reciprocal(x: jax.Array) -> jax.Array:
  """``1 / x`` where ``x != 0`` and ``0`` where ``x == 0``; NaN stays NaN."""
  nonzero = x != 0
  return jnp.where(nonzero, 1 / jnp.where(nonzero, x, 1), 0)


def cast_like(new: Any, old: Any) -> Any:
  # Keeps state dtypes (and weak types) fixed across updates, so states pass
  # through lax.cond / lax.scan unchanged.
  return jax.tree.map(
    lambda n, o: jnp.asarray(n, dtype=jnp.result_type(o)).reshape(jnp.shape(o)),
    new,
    old,
  )


def from_weighting(
  weighting: WeightingFn,
  *,
  name: str = "from_weighting",
  needs: Needs = "gram",
  needs_losses: bool = False,
  num_tasks: int | None = None,
  init_state: Callable[[int], Any] | None = None,
  key: KeyLike | None = None,
  blocks: tree.Blocks = None,
  measure_on: tree.Selection = None,
) -> BalancingTransformation:
  """Builds a balancing transform ``sum_t w_t g_t`` from a weighting.

  The update is one pass over the task gradients for what the weighting
  needs (Gram matrix or squared norms; none for ``needs="nothing"``), the
  weighting on ``[T, T]``-sized arrays, and one combine pass.

  Args:
    weighting: ``(gram, losses, state, key, *, num_tasks) -> (weights [T],
      state)``; must be jit-able and, block-wise, ``vmap``-able.
    name: the method name used in error messages.
    needs: ``"gram"`` (``[T, T]``), ``"sq_norms"`` (``[T]``, the Gram
      diagonal) or ``"nothing"``; what the weighting receives as ``gram``.
    needs_losses: whether ``update`` requires ``losses=`` (``[T]``).
    num_tasks: ``T`` or ``None``. Given, the state records the last
      ``weights`` and ``update`` checks ``T``. Factories whose state depends
      on ``T`` require it (:func:`require_num_tasks`).
    init_state: ``num_tasks -> state`` for weightings with their own state
      (one copy per block when block-wise); called with ``num_tasks`` as
      given (possibly ``None`` for state that does not depend on ``T``, such
      as a solver's :class:`mtgrad.SolverInfo`).
    key: PRNG key (or int seed) for stochastic weightings; kept in the state
      and split at every update.
    blocks: ``None`` (one weighting for the whole tree), ``"leaf"`` (one per
      leaf) or a pytree / callable of labels grouping leaves (see
      :func:`mtgrad.block_ids`); weights are then ``[B, T]``.
    measure_on: the leaves on which ``needs`` is measured (``None``: all;
      a pytree of bools, a ``(path, leaf) -> bool`` predicate or a
      ``params -> mask`` callable, see :func:`mtgrad.select_leaves`), e.g.
      GradNorm's last shared layer; the combine still uses every leaf. Not
      with ``blocks``.

  Returns:
    A :class:`BalancingTransformation` whose state is a
    :class:`BalancingState`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> def halves(gram, losses, state, key, *, num_tasks):
    ...   return jnp.full(num_tasks, 1 / num_tasks), state
    >>> tx = mtgrad.from_weighting(halves, needs="nothing", num_tasks=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> grads = {"w": jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"], state.weights
    (Array([2., 2., 2.], dtype=float32), Array([0.5, 0.5], dtype=float32))
  """
  if needs not in ("gram", "sq_norms", "nothing"):
    raise ValueError(
      f"mtgrad.{name}: needs must be 'gram', 'sq_norms' or 'nothing', got {needs!r}."
    )
  if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
    raise ValueError(f"mtgrad.{name}: num_tasks must be a positive int, got {num_tasks!r}.")
  if measure_on is not None and blocks is not None:
    raise ValueError(f"mtgrad.{name}: measure_on and blocks cannot be combined.")
  initial_key = as_key(key)

  def measured(task_grads):
    if measure_on is None:
      return task_grads
    marks = tree.select_leaves(measure_on, tree.params_like(task_grads), f"mtgrad.{name}")
    return [g for g, m in zip(jax.tree.leaves(task_grads), marks, strict=True) if m]

  def init_fn(params):
    if measure_on is not None:
      tree.select_leaves(measure_on, params, f"mtgrad.{name}")  # a bad selection fails here
    acc = tree.accumulation_dtype(*(jnp.result_type(p) for p in jax.tree.leaves(params)))
    num_blocks = None if blocks is None else len(tree.block_ids(blocks, params)[1])
    weights = None
    if num_tasks is not None:
      shape = (num_tasks,) if num_blocks is None else (num_blocks, num_tasks)
      weights = jnp.zeros(shape, acc)
    weighting_state = () if init_state is None else init_state(num_tasks)
    if num_blocks is not None:
      weighting_state = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_blocks, *jnp.shape(x))),
        weighting_state,
      )
    return BalancingState(
      count=jnp.zeros([], jnp.int32),
      weights=weights,
      key=initial_key,
      weighting_state=weighting_state,
    )

  def update_fn(task_grads, state, params=None, *, losses=None, **extra_args):
    del extra_args
    if isinstance(task_grads, LossesOnly):
      return _weights_only(task_grads.num_tasks, state, losses)
    t = check_task_grads(task_grads, params, num_tasks, name)
    losses = check_losses(losses, t, name) if needs_losses else None

    if needs == "gram":
      quantity = (
        tree.gram(measured(task_grads)) if blocks is None else tree.block_gram(task_grads, blocks)
      )
    elif needs == "sq_norms":
      quantity = (
        tree.sq_norms(measured(task_grads))
        if blocks is None
        else tree.block_sq_norms(task_grads, blocks)
      )
    else:
      quantity = None

    new_key, step_key = (None, None) if state.key is None else jax.random.split(state.key)
    if blocks is None:
      weights, weighting_state = weighting(
        quantity, losses, state.weighting_state, step_key, num_tasks=t
      )
      expected_shape = (t,)
    else:
      num_blocks = len(tree.block_ids(blocks, tree.params_like(task_grads))[1])
      keys = None if step_key is None else jax.random.split(step_key, num_blocks)
      if quantity is None:
        quantity = jnp.zeros((num_blocks, 0))  # vmap needs a mapped argument

      def per_block(q, s, k):
        return weighting(None if needs == "nothing" else q, losses, s, k, num_tasks=t)

      weights, weighting_state = jax.vmap(per_block, in_axes=(0, 0, None if keys is None else 0))(
        quantity, state.weighting_state, keys
      )
      expected_shape = (num_blocks, t)
    weights = jnp.asarray(weights)
    if weights.shape != expected_shape:
      raise ValueError(
        f"mtgrad.{name}: the weighting returned weights of shape "
        f"{weights.shape}, expected {expected_shape}."
      )

    updates = tree.combine(task_grads, weights, blocks=blocks)
    return updates, _next_state(state, weights, new_key, weighting_state)

  def _weights_only(t, state, losses):
    # The single-backward path (weights_from_losses): no gradient at all.
    if needs != "nothing" or blocks is not None:
      raise ValueError(
        f"mtgrad.{name} computes its weights from the task gradients "
        f"({'block-wise ' if blocks is not None else ''}needs={needs!r}), so it has no "
        "single-backward path: pass the stacked task gradients to update()."
      )
    if num_tasks is not None and t != num_tasks:
      raise ValueError(f"mtgrad.{name} was built with num_tasks={num_tasks} but got {t} losses.")
    losses = check_losses(losses, t, name) if needs_losses else None
    new_key, step_key = (None, None) if state.key is None else jax.random.split(state.key)
    weights, weighting_state = weighting(None, losses, state.weighting_state, step_key, num_tasks=t)
    weights = jnp.asarray(weights)
    return weights, _next_state(state, weights, new_key, weighting_state)

  return BalancingTransformation(init_fn, update_fn)


def _next_state(state: BalancingState, weights, key, weighting_state) -> BalancingState:
  return BalancingState(
    count=optax.safe_int32_increment(state.count),
    weights=None if state.weights is None else cast_like(weights, state.weights),
    key=key,
    weighting_state=cast_like(weighting_state, state.weighting_state),
  )


def weights_from_losses(
  transform: BalancingTransformation, state: Any, losses: jax.Array, **extra_args: Any
) -> tuple[jax.Array, Any]:
  r"""The weights of a loss-only method, without any task gradient.

  Methods whose weights depend on the losses alone (``sum``, ``rlw``,
  ``inverse_loss``, ``uncertainty``, ``dwa``, ...) do not need the ``T``
  stacked task gradients: one backward pass of the weighted loss
  :math:`\sum_t w_t L_t` gives the same update. With :func:`jax.vjp` the
  forward pass is shared too::

    losses, pullback = jax.vjp(lambda p: per_task_losses(p, batch), params)
    weights, state = mtgrad.weights_from_losses(balancer, state, losses)
    (grads,) = pullback(weights.astype(losses.dtype))  # = sum_t w_t g_t

  Args:
    transform: a transform built by :func:`mtgrad.from_weighting` whose
      weighting needs neither the Gram matrix nor the squared norms
      (``needs="nothing"``), used globally (no ``blocks``).
    state: its :class:`BalancingState` (not a surrounding chain's state).
    losses: the per-task losses ``[T]``.
    **extra_args: forwarded to ``update`` (e.g. FAMO's ``post_step_losses``).

  Returns:
    ``(weights [T], new_state)``: the weights of this step and the state
    after it, exactly as ``transform.update`` would produce them.

  Raises:
    ValueError: for methods whose weights depend on the task gradients.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.inverse_loss(num_tasks=2)
    >>> weights, state = mtgrad.weights_from_losses(
    ...   tx, tx.init({"w": jnp.zeros(3)}), jnp.array([2.0, 0.5]))
    >>> weights
    Array([0.5, 2. ], dtype=float32)
  """
  losses = jnp.asarray(losses)
  if losses.ndim != 1:
    raise ValueError(f"mtgrad.weights_from_losses: losses must be [T], got shape {losses.shape}.")
  return transform.update(LossesOnly(losses.shape[0]), state, losses=losses, **extra_args)
