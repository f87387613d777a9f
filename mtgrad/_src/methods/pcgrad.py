"""PCGrad: projecting conflicting gradients (Yu et al. 2020), in Gram space."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods import _coefficients
from mtgrad._src.solvers.cosine import norms_and_cosines


def pcgrad_weights(
  gram: jax.Array, key: jax.Array, *, reduction: _coefficients.Reduction = "sum"
) -> jax.Array:
  """The PCGrad weights for one Gram matrix and one step key.

  The visiting orders are ``_coefficients.task_orders(key, T)``.

  Args:
    gram: ``[T, T]`` Gram matrix.
    key: the step's PRNG key.
    reduction: ``"sum"`` (paper) or ``"mean"``.

  Returns:
    ``[T]`` weights ``w`` with ``sum_t w_t g_t = sum_i ĝ_i`` (divided by
    ``T`` for ``"mean"``).
  """
  num = gram.shape[0]
  norms, cos = norms_and_cosines(gram)

  def visit(j, a, q, carry):
    # <ĝ_i, g_j> < 0  <=>  q_j < 0; the projection removes q_j u_j (K_jj = 1).
    # A zero g_j has q_j = 0 and is skipped.
    return jnp.where(q[j] < 0, -q[j], 0), carry

  a, _ = _coefficients.sweep(visit, cos, _coefficients.task_orders(key, num))
  return _coefficients.weights(norms, a, reduction)


def pcgrad(
  key: base.KeyLike,
  *,
  reduction: _coefficients.Reduction = "sum",
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
) -> base.BalancingTransformation:
  r"""PCGrad: project each task gradient off the gradients it conflicts with.

  For each task :math:`i`, starting from :math:`\hat g_i = g_i`, visit the
  other tasks :math:`j \ne i` in a random order (fresh for every task and
  every step) and remove the conflicting component:

  .. math::

     \text{if } \langle \hat g_i, g_j \rangle < 0: \quad
     \hat g_i \leftarrow \hat g_i
       - \frac{\langle \hat g_i, g_j \rangle}{\lVert g_j \rVert^2} g_j ,
     \qquad d = \sum_i \hat g_i .

  Every :math:`\hat g_i` stays a combination :math:`\sum_k C_{ik} g_k` of
  the original gradients and every projection changes one coefficient, read
  off the Gram matrix: the update is :math:`d = \sum_k w_k g_k` with
  :math:`w = \mathbf{1}^\top C`, computed from one Gram pass and one combine
  pass instead of :math:`T^2` passes over the gradients. The sweep runs on
  the cosine matrix in scale-free coefficients (tasks vectorised, a loop of
  :math:`T - 1` projections), so gradient norms spanning many orders of
  magnitude do not lose precision.

  The orders of a step are ``_coefficients.task_orders(step_key, T)``, with
  ``step_key`` the second half of ``jax.random.split(state.key)`` (block
  ``b`` of a block-wise transform uses
  ``jax.random.split(step_key, num_blocks)[b]``).

  Args:
    key: PRNG key or int seed for the visiting orders; the state splits it
      at every update, so the same key gives the same results.
    reduction: ``"sum"`` (the paper's :math:`\sum_i \hat g_i`) or ``"mean"``
      (divided by :math:`T`, the scale of :func:`mtgrad.mean`).
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` (PCGrad per parameter tensor)
      or a grouping of leaves; see :func:`mtgrad.from_weighting`.

  Returns:
    A :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.pcgrad(key=0)
    >>> grads = {"w": jnp.array([[4.0, 0.0], [-3.0, 4.0]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([2.56, 5.92], dtype=float32)

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for
    Multi-Task Learning*, NeurIPS 2020 (arXiv:2001.06782), Algorithm 1.

  Warning:
    Follows the paper's Algorithm 1 (each task visits the *other* tasks in
    its own random order). Reference codes differ: LibMTL shuffles all
    ``T`` tasks, the task itself included, for each task; the authors'
    TensorFlow code visits all tasks, itself included, in one fixed order.
    A zero gradient is never projected onto (the reference codes divide by
    its zero norm).

  Warning:
    With ``T > 2`` the result is not conflict-free in general, and with a
    fixed key it is not invariant to reordering the tasks (the random orders
    are attached to task indices). With ``T = 2`` it is deterministic.
  """
  if key is None:
    raise ValueError("mtgrad.pcgrad needs a PRNG key (or an int seed).")
  _coefficients.check_reduction(reduction, "pcgrad")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, num_tasks
    return pcgrad_weights(gram, key, reduction=reduction), state

  return base.from_weighting(
    weighting, name="pcgrad", needs="gram", num_tasks=num_tasks, key=key, blocks=blocks
  )
