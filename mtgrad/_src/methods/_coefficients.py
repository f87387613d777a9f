"""Gram-space tracking of sequentially modified task gradients (PCGrad, GradVac).

PCGrad and GradVac modify each task gradient ``g_i`` by a sequence of steps
``ĝ_i <- ĝ_i + c g_j`` over the other tasks ``j`` in a random order. Every
``ĝ_i`` stays a combination of the original gradients, so the whole sequence
runs on the ``[T, T]`` Gram matrix: one Gram pass and one combine pass over
the gradients instead of ``T^2`` passes.

To be exact at any scale (task gradients whose norms span many orders of
magnitude are the normal case), the sweep works in scale-free variables:
with ``n_k = ||g_k||``, unit gradients ``u_k = g_k / n_k`` and the cosine
matrix ``K = D^-1 G D^-1`` (``D = diag(n)``), the modified gradient is
written ``ĝ_i = n_i sum_k a_ik u_k``. The row ``a_i`` starts as ``e_i`` and
only ever meets cosines, so the sweep never sees a norm; the norms return
once, in the weights ``w_k = sum_i n_i a_ik / n_k``. The sweep keeps
``q_i = a_i K`` (``<ĝ_i, g_j> = n_i n_j q_ij``) up to date at ``O(T)`` per
step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

# visit(j, a_i [T], q_i [T], carry_i) -> (increment of a_ij, carry_i)
Visit = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
Reduction = Literal["sum", "mean"]


def check_reduction(reduction: str, method: str) -> None:
  """Raises unless ``reduction`` is ``"sum"`` or ``"mean"``."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"mtgrad.{method}: reduction must be 'sum' or 'mean', got {reduction!r}.")


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """The random visiting orders of one step: row ``i`` lists the other tasks.

  Each task gets its own uniformly random order of the ``T - 1`` other tasks:
  row ``i`` sorts 31-bit random keys drawn from ``key``, with task ``i``'s
  own key set above all others and dropped.

  Args:
    key: the step's PRNG key.
    num_tasks: ``T``.

  Returns:
    ``[T, T - 1]`` int32; row ``i`` is a permutation of ``{0..T-1} \\ {i}``.
  """
  bits = jax.random.bits(key, (num_tasks, num_tasks), jnp.uint32) >> 1
  bits = jnp.where(jnp.eye(num_tasks, dtype=bool), jnp.uint32(2**31), bits)
  return jnp.argsort(bits, axis=1)[:, : num_tasks - 1].astype(jnp.int32)


def sweep(visit: Visit, cos: jax.Array, orders: jax.Array, carry: Any = None):
  """Runs the sequential modification of every task gradient, tasks in parallel.

  For each task ``i`` (vectorised with ``vmap``), starting from ``a_i = e_i``,
  visits ``j = orders[i, s]`` for ``s = 0 .. T-2`` (a ``fori_loop``) and adds
  ``visit(j, a_i, q_i, carry_i)`` to ``a_ij``.

  Args:
    visit: ``(j, a_i, q_i, carry_i) -> (increment, carry_i)``, with
      ``q_i = a_i K`` the cosine-scaled inner products of ``ĝ_i`` with every
      original gradient.
    cos: ``[T, T]`` cosine matrix from :func:`cosines`.
    orders: ``[T, T - 1]`` from :func:`task_orders`.
    carry: per-task carry with a leading ``T`` axis (or ``None``).

  Returns:
    ``(a [T, T], carry)``: row ``i`` holds the coefficients of ``ĝ_i`` in
    the scale-free variables.
  """
  num = cos.shape[0]
  if num == 1:  # nothing to visit
    return jnp.ones((1, 1), cos.dtype), carry

  def one_task(i, order, carry_i):
    def body(step, state):
      a, q, carry_i = state
      j = order[step]
      increment, carry_i = visit(j, a, q, carry_i)
      return a.at[j].add(increment), q + increment * cos[j], carry_i

    a = jnp.zeros(num, cos.dtype).at[i].set(1)
    return lax.fori_loop(0, num - 1, body, (a, cos[i], carry_i))

  a, _, carry = jax.vmap(one_task)(jnp.arange(num), orders, carry)
  return a, carry


def weights(norms: jax.Array, a: jax.Array, reduction: Reduction = "sum") -> jax.Array:
  """``w_k = sum_i n_i a_ik / n_k``: the weights of ``sum_i ĝ_i`` on the ``g_k``
  (divided by ``T`` for ``reduction="mean"``).

  A zero gradient gets weight 0; NaN norms give NaN weights. The ratios are
  divided directly, so an untouched task keeps a weight of exactly 1.
  """
  nonzero = norms != 0
  ratios = norms[:, None] / jnp.where(nonzero, norms, 1)[None, :]  # [T, T]: n_i / n_k
  total = jnp.sum(jnp.where(nonzero[None, :], ratios * a, 0), axis=0)
  return total / norms.shape[0] if reduction == "mean" else total
