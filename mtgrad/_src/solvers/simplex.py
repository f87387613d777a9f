"""Euclidean projection onto the probability simplex."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project_simplex(v: jax.Array, total: float = 1.0) -> jax.Array:
  r"""Exact Euclidean projection of ``v`` (``[T]``) onto
  :math:`\{w \ge 0, \sum_t w_t = \text{total}\}`.

  The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008):
  ``w = max(v - tau, 0)`` with the threshold ``tau`` found from the sorted
  entries. ``O(T log T)``, no loop; NaN in gives NaN out.

  Args:
    v: ``[T]`` point to project.
    total: the simplex's sum (positive).

  Returns:
    ``[T]`` projection, same dtype as ``v``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mtgrad._src.solvers.simplex import project_simplex
    >>> project_simplex(jnp.array([2.0, 0.0, -1.0]))
    Array([1., 0., 0.], dtype=float32)
  """
  num = v.shape[-1]
  u = jnp.sort(v)[::-1]
  cumulative = jnp.cumsum(u) - total
  index = jnp.arange(1, num + 1, dtype=v.dtype)
  active = u - cumulative / index > 0
  rho = jnp.maximum(jnp.sum(active), 1)
  tau = cumulative[rho - 1] / rho.astype(v.dtype)
  return jnp.maximum(v - tau, 0)
