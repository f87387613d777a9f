"""Gradient Vaccine (Wang et al. 2021), in Gram space."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.methods import _coefficients
from mtgrad._src.solvers.cosine import norms_and_cosines


class GradVacState(NamedTuple):
  """State of :func:`gradvac` (one per block when block-wise).

  Attributes:
    phi: ``[T, T]`` EMA targets :math:`\\hat\\phi_{ij}` of the cosine between
      the modified gradient of task ``i`` and the gradient of task ``j``
      (zeros at first; the diagonal is unused).
  """

  phi: jax.Array  # [T, T]


def _sqrt_one_minus_square(x: jax.Array) -> jax.Array:
  # sqrt(1 - x^2) without cancellation near |x| = 1.
  return jnp.sqrt(jnp.maximum((1 - x) * (1 + x), 0))


def gradvac_weights(
  gram: jax.Array,
  phi: jax.Array,
  key: jax.Array,
  beta: jax.typing.ArrayLike,
  *,
  reduction: _coefficients.Reduction = "sum",
) -> tuple[jax.Array, jax.Array]:
  """The GradVac weights and updated targets for one Gram matrix and step key.

  The visiting orders are ``_coefficients.task_orders(key, T)``, the same as
  :func:`mtgrad.pcgrad`'s for the same key.

  Args:
    gram: ``[T, T]`` Gram matrix.
    phi: ``[T, T]`` EMA targets before this step.
    key: the step's PRNG key.
    beta: EMA rate (may be traced).
    reduction: ``"sum"`` (paper) or ``"mean"``.

  Returns:
    ``(weights [T], phi [T, T])``.
  """
  num = gram.shape[0]
  norms, cos = norms_and_cosines(gram)
  phi = jnp.asarray(phi, cos.dtype)
  beta = jnp.asarray(beta, cos.dtype)

  def visit(j, a, q, phi_i):
    # In scale-free coefficients: ||ĝ_i|| = n_i sqrt(a K a), cos(ĝ_i, g_j) =
    # (a K)_j / sqrt(a K a), and adding x g_j to ĝ_i adds x n_j / n_i to a_j.
    target = phi_i[j]
    norm = jnp.sqrt(jnp.maximum(jnp.dot(a, q), 0))
    defined = (norm > 0) & (cos[j, j] > 0)  # both gradients non-zero
    c = jnp.clip(q[j] * base.safe_reciprocal(norm), -1, 1)
    s_target = _sqrt_one_minus_square(target)
    # A target of exactly 1 cannot be reached by adding a multiple of g_j.
    increment = (
      norm * (target * _sqrt_one_minus_square(c) - c * s_target) * base.safe_reciprocal(s_target)
    )
    increment = jnp.where(defined & (c < target), increment, 0)
    # EMA of the cosine seen before the correction, at every visit (paper,
    # Algorithm 1); an undefined cosine (a zero gradient) leaves it.
    phi_i = phi_i.at[j].set(jnp.where(defined, (1 - beta) * target + beta * c, target))
    return increment, phi_i

  a, phi = _coefficients.sweep(visit, cos, _coefficients.task_orders(key, num), phi)
  return _coefficients.weights(norms, a, reduction), phi


def gradvac(
  beta: jax.typing.ArrayLike = 0.5,
  key: base.KeyLike | None = None,
  *,
  reduction: _coefficients.Reduction = "sum",
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
) -> base.BalancingTransformation:
  r"""Gradient Vaccine: raise each pair's gradient cosine to an adaptive target.

  For each task :math:`i`, starting from :math:`\hat g_i = g_i`, visit the
  other tasks :math:`j \ne i` in a random order (fresh for every task and
  every step). With :math:`\phi_{ij} = \cos(\hat g_i, g_j)` and the target
  :math:`\hat\phi_{ij}` (an EMA, zero at first):

  .. math::

     \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
     \hat g_i \leftarrow \hat g_i + \frac{\lVert \hat g_i \rVert
       \left(\hat\phi_{ij} \sqrt{1 - \phi_{ij}^2}
             - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\right)}
       {\lVert g_j \rVert \sqrt{1 - \hat\phi_{ij}^2}} \, g_j ,
     \qquad
     \hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} + \beta \phi_{ij},

  and :math:`d = \sum_i \hat g_i`. The correction makes the cosine of
  :math:`\hat g_i` with :math:`g_j` exactly :math:`\hat\phi_{ij}`. With a
  zero target it is the PCGrad projection, so ``beta=0`` gives
  :func:`mtgrad.pcgrad` (same key, same orders) at every step.

  As for PCGrad, every :math:`\hat g_i` is tracked as a combination of the
  original gradients on the cosine matrix (one Gram pass, one combine pass).
  Block-wise (``blocks="leaf"`` or a grouping), every block has its own
  targets (``phi`` is ``[B, T, T]``), as the paper's per-layer variant.

  Args:
    beta: EMA rate of the targets, in ``[0, 1]`` (default 0.5, as LibMTL); may
      be traced (``optax.inject_hyperparams``).
    key: PRNG key or int seed for the visiting orders (required).
    reduction: ``"sum"`` (paper) or ``"mean"`` (divided by ``T``).
    num_tasks: ``T`` (required: the targets are ``[T, T]`` state).
    blocks: ``None`` (whole model), ``"leaf"`` (per parameter tensor) or a
      grouping of leaves; see :func:`mtgrad.from_weighting`.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its ``weighting_state`` is a
    :class:`GradVacState`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.gradvac(beta=0.5, key=0, num_tasks=2)
    >>> grads = {"w": jnp.array([[4.0, 0.0], [-3.0, 4.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]  # first step: targets 0, as PCGrad
    Array([2.56, 5.92], dtype=float32)
    >>> state.weighting_state.phi  # half of the cosines seen
    Array([[ 0. , -0.3],
           [-0.3,  0. ]], dtype=float32)

  References:
    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*,
    ICLR 2021 (arXiv:2010.05874), Algorithm 1 and Eq. (2)-(3).

  Warning:
    The target is updated at every visit with the cosine measured before
    the correction, as in the paper's Algorithm 1; LibMTL updates it only
    when a correction was made. A pair whose cosine is undefined (a zero
    gradient) is neither corrected nor updated, and a target of exactly 1
    (unreachable by adding a multiple of :math:`g_j`) makes no correction;
    the reference codes add ``1e-8`` to the denominators instead. NaN
    gradients give a NaN update and leave the targets as they were.

  Warning:
    Not conflict-free and, with a fixed key, not invariant to reordering
    the tasks (the random orders and targets are attached to task indices).
  """
  if key is None:
    raise ValueError("mtgrad.gradvac needs a PRNG key (or an int seed).")
  base.require_num_tasks(num_tasks, "gradvac")
  _coefficients.check_reduction(reduction, "gradvac")
  if isinstance(beta, int | float) and not 0 <= beta <= 1:
    raise ValueError(f"mtgrad.gradvac: beta must be in [0, 1], got {beta!r}.")

  def init_state(num_tasks):
    return GradVacState(phi=jnp.zeros((num_tasks, num_tasks), jnp.float32))

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, num_tasks
    weights, phi = gradvac_weights(gram, state.phi, key, beta, reduction=reduction)
    return weights, GradVacState(phi=phi)

  return base.from_weighting(
    weighting,
    name="gradvac",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_state,
    key=key,
    blocks=blocks,
  )
