"""Gradient cosine similarity (Du et al. 2018): auxiliary gradients gated by their cosine."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods.metabalance import check_primary_range
from mtgrad._src.methods.metabalance import primary_index
from mtgrad._src.solvers.cosine import norms_and_cosines

Mode = Literal["mask", "weighted"]


def gcs(
  primary: int = 0,
  mode: Mode = "mask",
  *,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
) -> base.BalancingTransformation:
  r"""Use an auxiliary gradient only where it points the primary task's way.

  With :math:`p` the primary task and :math:`\cos_t = \cos(g_p, g_t)`:

  .. math::

     d = g_p + \sum_{t \ne p} w_t\, g_t, \qquad
     w_t = \mathbb{1}[\cos_t > 0] \;\; (\texttt{"mask"}), \qquad
     w_t = \max(\cos_t, 0) \;\; (\texttt{"weighted"}).

  An auxiliary gradient that conflicts with the primary one is dropped
  (weighted: scaled down as it turns away), so :math:`\langle d, g_p
  \rangle \ge \lVert g_p \rVert^2`: the primary loss decreases at least as
  fast as alone, to first order (the paper's argument for convergence to
  critical points of the primary task). Auxiliary tasks are gated
  independently of one another; nothing stops two of them conflicting.

  The cosines come from the Gram matrix (one pass over the gradients, and
  the cosine matrix computed without squaring norms). With ``blocks`` every
  block (every leaf, or a grouping) is gated on its own cosines. Over the
  whole model, leaves where only one task has a gradient (task heads) add
  nothing to :math:`\langle g_p, g_t \rangle`, so the *sign* of the cosine is
  that of the shared parameters; its magnitude is not.

  Args:
    primary: index of the primary (main) task, a static Python int.
    mode: ``"mask"`` (the paper's unweighted version) or ``"weighted"``
      (scaled by the clipped cosine).
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model, default), ``"leaf"`` or a grouping of
      leaves (see :func:`mtgrad.from_weighting`).

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.gcs(primary=0, num_tasks=3)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"], state.weights  # the third task opposes the first: dropped
    (Array([2., 1.], dtype=float32), Array([1., 1., 0.], dtype=float32))

  References:
    Du, Czarnecki, Jayakumar, Farajtabar, Pascanu & Lakshminarayanan,
    *Adapting Auxiliary Losses Using Gradient Similarity*, arXiv:1812.02224,
    2018.

  Warning:
    A cosine of exactly 0 (orthogonal gradients, or a zero primary or
    auxiliary gradient) drops the auxiliary gradient: the mask tests
    ``cos > 0`` strictly, as AuxiLearn's reimplementation does; a rule
    written ``cos >= 0`` would keep an orthogonal one. Applied to the whole
    model, the mask also gates the auxiliary task's own head; the paper
    updates task-specific parameters with their own loss, so give the
    transform the shared parameters only for the paper's setting.
  """
  if mode not in ("mask", "weighted"):
    raise ValueError(f"mtgrad.gcs: mode must be 'mask' or 'weighted', got {mode!r}.")
  index = primary_index(primary, "gcs")
  if isinstance(num_tasks, int):
    check_primary_range(index, num_tasks, "gcs")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key
    check_primary_range(index, num_tasks, "gcs")
    _, cosine = norms_and_cosines(gram)
    similarity = cosine[index]
    if mode == "mask":
      # NaN stays NaN: a NaN gradient must not be dropped silently.
      gate = jnp.where(jnp.isnan(similarity), similarity, (similarity > 0).astype(cosine.dtype))
    else:
      gate = jnp.maximum(similarity, 0)
    weights = jnp.where(jnp.arange(num_tasks) == index, jnp.ones_like(gate), gate)
    return weights, state

  return base.from_weighting(
    weighting, name="gcs", needs="gram", num_tasks=num_tasks, blocks=blocks
  )
