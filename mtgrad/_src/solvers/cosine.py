"""Norms and cosine matrix of a Gram matrix: the scale-free view of the tasks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base


def norms_and_cosines(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(n [T], K [T, T])`` with ``G = diag(n) K diag(n)``.

  Task gradients of very different scales are the normal case, so the
  methods that allow it work with ``K`` and ``n`` separately instead of the
  raw Gram, whose entries can span ``1e-20..1e20``. Nothing here squares a
  norm: ``|G_ij| / n_i <= n_j`` (Cauchy-Schwarz), so dividing one side at a
  time never overflows or underflows where ``G`` itself did not.

  Args:
    gram: ``[T, T]`` Gram matrix (symmetrised here against rounding).

  Returns:
    ``norms`` (``||g_t||``) and the cosine matrix, clipped to ``[-1, 1]``,
    with a unit diagonal for non-zero tasks; a zero gradient has an all-zero
    row and column (diagonal included). NaN stays NaN off the diagonal.
  """
  gram = 0.5 * (gram + gram.T)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
  inverse = base.safe_reciprocal(norms)
  cosine = jnp.clip((gram * inverse[:, None]) * inverse[None, :], -1, 1)
  live = (norms > 0).astype(gram.dtype)
  return norms, jnp.where(jnp.eye(gram.shape[0], dtype=bool), jnp.diag(live), cosine)
