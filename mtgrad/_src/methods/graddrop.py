"""Gradient Sign Dropout (Chen et al. 2020)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtgrad._src import base
from mtgrad._src import tree


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    count: number of updates so far (int32).
    key: the PRNG key, split at every update.
  """

  count: jax.Array  # [] int32
  key: jax.Array


def graddrop(
  key: base.KeyLike,
  *,
  leak: float | jax.typing.ArrayLike = 0.0,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""Gradient Sign Dropout: per coordinate, keep one sign at random.

  For every coordinate (every element of every leaf) the *positive sign
  purity* :math:`P = \frac{1}{2}\left(1 + \frac{\sum_t g_t}{\sum_t |g_t|}\right)`
  is the probability of keeping the positive entries. With one
  :math:`U \sim \mathcal{U}(0, 1)` per coordinate and step, task ``t``'s mask
  is

  .. math::

     M_t = \mathbb{1}[P > U]\,\mathbb{1}[g_t > 0]
         + \mathbb{1}[P < U]\,\mathbb{1}[g_t < 0],
     \qquad
     d = \sum_t \bigl(\ell_t + (1 - \ell_t) M_t\bigr)\, g_t ,

  so either all the positive or all the negative entries survive, the
  positive ones with probability ``P``. Coordinates where the tasks agree in
  sign pass unchanged (``P`` is 0 or 1). A leak :math:`\ell_t \in [0, 1]` lets
  that fraction of task ``t``'s gradient through regardless of the mask
  (``leak = 1``: the plain sum). Output: the sum over tasks, as in the
  paper's Algorithm 1.

  This is element-wise, not a weighted combination of whole gradients, so it
  has no Gram matrix and no ``weights``; it is positively homogeneous
  (``P`` is a ratio) and permutation-equivariant, not linear.

  Args:
    key: PRNG key or int seed; the state splits it at every update (same key,
      same masks).
    leak: the leak :math:`\ell`, a scalar or one value per task (``[T]``),
      in ``[0, 1]``; default 0 (plain GradDrop). May be traced.
    num_tasks: ``T``; optional, checked against the gradients when given.

  Returns:
    A :class:`mtgrad.BalancingTransformation` with a :class:`GradDropState`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.graddrop(key=0)
    >>> grads = {"w": jnp.array([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(3)}))
    >>> float(updates["w"][0])  # both tasks positive: kept
    4.0
    >>> [float(x) for x in updates["w"][1:]]  # conflicts: one sign survives
    [1.0, 0.5]

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
    NeurIPS 2020 (arXiv:2010.06808).

  Warning:
    The paper applies GradDrop to the gradients at a chosen layer's
    *activations* (summed over the batch after multiplying by the sign of the
    input) and backpropagates the result; here it applies to the given task
    gradients (usually the parameters; gradients with respect to a shared
    representation work the same way). LibMTL implements only the activation version; the CAGrad
    authors' comparison code applies it to the shared parameters' gradients,
    as here (but averages over tasks). The paper's optional monotone
    transform of ``P`` is the identity here. A coordinate where every task's
    gradient is zero gets ``P = 1/2`` and output 0.
  """
  if key is None:
    raise ValueError("mtgrad.graddrop needs a PRNG key (or an int seed).")
  if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
    raise ValueError(f"mtgrad.graddrop: num_tasks must be a positive int, got {num_tasks!r}.")
  initial_key = base.as_key(key)
  leak_shape = np.shape(leak)
  if len(leak_shape) > 1:
    raise ValueError(
      f"mtgrad.graddrop: leak must be a scalar or have shape [T], got shape {leak_shape}."
    )
  if num_tasks is not None and leak_shape not in ((), (num_tasks,)):
    raise ValueError(
      f"mtgrad.graddrop: leak has shape {leak_shape}, expected () or ({num_tasks},)."
    )
  try:
    in_range = bool(jnp.all((jnp.asarray(leak) >= 0) & (jnp.asarray(leak) <= 1)))
  except jax.errors.ConcretizationTypeError:  # traced (optax.inject_hyperparams)
    in_range = True
  if not in_range:
    raise ValueError(f"mtgrad.graddrop: leak must lie in [0, 1], got {leak!r}.")

  def init_fn(params):
    del params
    return GradDropState(count=jnp.zeros([], jnp.int32), key=initial_key)

  def update_fn(task_grads, state, params=None, *, losses=None, **extra_args):
    del losses, extra_args
    t = base.check_task_grads(task_grads, params, num_tasks, "graddrop")
    if leak_shape not in ((), (t,)):
      raise ValueError(f"mtgrad.graddrop: leak has shape {leak_shape}, expected () or ({t},).")
    new_key, step_key = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(task_grads)
    keys = jax.random.split(step_key, len(leaves))

    def drop(leaf, leaf_key):
      acc = tree.accumulation_dtype(leaf.dtype)
      total = tree.task_sum(lambda g: g.astype(acc), leaf)
      mass = tree.task_sum(lambda g: jnp.abs(g.astype(acc)), leaf)
      purity = 0.5 * (1 + total * base.safe_reciprocal(mass))  # [*leaf_shape]
      # U in [tiny, 1): P = 1 always keeps, P = 0 always drops positives.
      uniform = jax.random.uniform(
        leaf_key, leaf.shape[1:], acc, minval=jnp.finfo(acc).tiny, maxval=1
      )
      keep_positive = purity > uniform
      keep_negative = purity < uniform
      rates = jnp.broadcast_to(jnp.asarray(leak, acc), (t,))

      def kept(g, rate):
        g = g.astype(acc)
        mask = (keep_positive & (g > 0)) | (keep_negative & (g < 0))
        return (rate + (1 - rate) * mask.astype(acc)) * g

      out = tree.task_sum(kept, leaf, rates)
      # Non-finite in, non-finite out: XLA may turn `mask * g` into a select,
      # which would hide a NaN (or inf) in a dropped entry.
      out = jnp.where(jnp.isfinite(mass), out, total)
      return out.astype(leaf.dtype)

    updates = [drop(leaf, k) for leaf, k in zip(leaves, keys, strict=True)]
    new_state = GradDropState(count=optax.safe_int32_increment(state.count), key=new_key)
    return jax.tree.unflatten(treedef, updates), new_state

  return base.BalancingTransformation(init_fn, update_fn)
