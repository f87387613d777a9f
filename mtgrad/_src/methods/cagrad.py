"""Conflict-Averse Gradient descent (Liu et al. 2021)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers.cagrad import cagrad_weights
from mtgrad._src.solvers.info import SolverState

Rescale = Literal["none", "1+c", "1+c^2"]
_RESCALES = ("none", "1+c", "1+c^2")


def _check_concrete(name: str, value, low: float, *, integer: bool = False) -> None:
  # Hyperparameters may be traced (optax.inject_hyperparams): check only
  # Python numbers, never branch on arrays.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if integer and not isinstance(value, int):
    raise ValueError(f"mtgrad.cagrad: {name} must be an int, got {value!r}.")
  if not value >= low:
    raise ValueError(f"mtgrad.cagrad: {name} must be >= {low}, got {value!r}.")


def cagrad(
  c: float | jax.Array = 0.5,
  *,
  rescale: Rescale = "none",
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | jax.Array = 500,
  tol: float | jax.Array = 1e-6,
) -> base.BalancingTransformation:
  r"""Conflict-Averse Gradient descent: the mean gradient, bent towards the worst task.

  CAGrad looks for the update that maximises the worst task's improvement in a
  ball around the mean gradient :math:`g_0 = \frac{1}{T}\sum_t g_t`:
  :math:`\max_d \min_t \langle g_t, d\rangle` s.t.
  :math:`\lVert d - g_0\rVert \le c \lVert g_0\rVert`. Its dual is a problem
  on the Gram matrix,

  .. math::

     w^\star = \operatorname*{argmin}_{w \in \Delta}\;
       w^\top G \tfrac{1}{T}\mathbf{1} + c\lVert g_0\rVert \sqrt{w^\top G w},
     \qquad
     d = g_0 + \frac{c \lVert g_0\rVert}{\lVert g_{w^\star}\rVert}\, g_{w^\star},

  with :math:`g_w = \sum_t w_t g_t` (Algorithm 1 of the paper). The update is
  linear in the gradients, with weights
  :math:`\frac{1}{T} + \frac{c\lVert g_0\rVert}{\lVert g_{w^\star}\rVert} w^\star`,
  divided by the ``rescale`` factor. ``c = 0`` is :func:`mtgrad.mean` exactly;
  as ``c`` grows the direction tends to MGDA's (the min-norm point of the
  convex hull).

  The dual is solved on ``G`` in JAX, in a bounded loop (accelerated projected
  gradient in the metric ``diag(G)`` on the cosine matrix and relative norms,
  exact simplex projection, then the exact optimality conditions on the
  support found; see :mod:`mtgrad._src.solvers.cagrad`). It stays accurate
  when the task gradients differ in scale by many orders of magnitude.

  Args:
    c: radius of the ball around the mean gradient, relative to its norm
      (``c >= 0``). Paper default 0.5 (0.4 on MT10/MT50 in its RL
      experiments). May be traced (``optax.inject_hyperparams``).
    rescale: divide the update by nothing (``"none"``, Algorithm 1 of the
      paper, the default), by ``1 + c`` (``"1+c"``), or by ``1 + c^2``
      (``"1+c^2"``: what the authors' released code uses in its experiments
      and LibMTL's default, ``rescale=1`` there). The update's norm lies
      between :math:`\lVert g_0\rVert` and :math:`(1+c)\lVert g_0\rVert`;
      ``"1+c"`` keeps it at most the mean's norm.
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves: solve
      one CAGrad problem per block (see :func:`mtgrad.from_weighting`).
    max_iters: iteration budget of the dual solver.
    tol: tolerance of the dual solver on its relative residual (the norm of
      the gradient mapping in scale-free variables, relative to
      :math:`(1 + c)\lVert g_0\rVert`).

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its state's
    ``weighting_state`` is a :class:`mtgrad.SolverState` whose ``info`` reports
    the dual solve (one per block when block-wise).

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.cagrad(c=0.5, num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].round(4)
    Array([0.7654, 1.    ], dtype=float32)
    >>> [round(float(x), 4) for x in state.weights]  # 1/T + c ||g0|| / ||g_w|| w
    [1.0154, 0.5]
    >>> bool(state.weighting_state.info.converged)
    True

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021 (arXiv:2110.14048),
    github.com/Cranial-XIX/CAGrad.

  Warning:
    The rescaling differs between the sources: the paper's Algorithm 1 has
    none (the default here), the authors' code divides by ``1 + c^2``
    (``rescale="1+c^2"``), LibMTL offers all three with ``1 + c^2`` as its
    default. Choose ``"1+c^2"`` to reproduce those numbers.

  Warning:
    When the dual optimum has :math:`g_{w^\star} = 0` (the zero vector lies in
    the convex hull of the task gradients and ``c >= 1``: a Pareto-stationary
    point) the dual does not determine a direction; the update is then the
    mean gradient ``g_0``. The same fallback applies when
    :math:`\lVert g_w\rVert` is below the float resolution of the Gram
    (:math:`\lVert g_w\rVert \le 4\sqrt{\epsilon}\,\sum_t w_t \lVert g_t\rVert`).
    Near that case the direction is ill-conditioned in every
    implementation.
  """
  if rescale not in _RESCALES:
    raise ValueError(f"mtgrad.cagrad: rescale must be one of {_RESCALES}, got {rescale!r}.")
  _check_concrete("c", c, 0.0)
  _check_concrete("max_iters", max_iters, 1, integer=True)
  _check_concrete("tol", tol, 0.0)

  def init_state(num_tasks):
    del num_tasks
    return SolverState.initial()

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key, state, num_tasks
    coef = jnp.asarray(c, gram.dtype)
    weights, info = cagrad_weights(gram, coef, max_iters=max_iters, tol=tol)
    if rescale == "1+c":
      weights = weights / (1 + coef)
    elif rescale == "1+c^2":
      weights = weights / (1 + coef**2)
    return weights, SolverState(info=info)

  return base.from_weighting(
    weighting,
    name="cagrad",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_state,
    blocks=blocks,
  )
