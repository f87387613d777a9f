"""FairGrad: alpha-fair resource allocation between the tasks (Ban & Ji 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers import nash as solver
from mtgrad._src.solvers.info import SolverInfo


class FairGradState(NamedTuple):
  """Weighting state of :func:`fairgrad` (``state.weighting_state``).

  Attributes:
    previous: ``[T]`` the solution of the last update, before any
      ``max_norm`` clipping: the warm start of the next solve (zeros before
      the first update); ``None`` when built without ``num_tasks`` (every
      solve then starts cold).
    info: the :class:`mtgrad.SolverInfo` of the last solve.
  """

  previous: jax.Array | None  # [T]
  info: SolverInfo


def _check_concrete(name: str, value, low: float, *, integer: bool = False) -> None:
  # Hyperparameters may be traced (optax.inject_hyperparams): check only
  # Python numbers, never branch on arrays.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if integer and not isinstance(value, int):
    raise ValueError(f"mtgrad.fairgrad: {name} must be an int, got {value!r}.")
  if not value >= low:
    raise ValueError(f"mtgrad.fairgrad: {name} must be >= {low}, got {value!r}.")


def fairgrad(
  alpha: float | jax.Array = 1.0,
  *,
  max_norm: float | jax.Array | None = None,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
) -> base.BalancingTransformation:
  r"""FairGrad: the alpha-fair allocation of the update between the tasks.

  Each task's utility is its first-order loss decrease
  :math:`\langle g_t, d \rangle` through the :math:`\alpha`-fair function
  :math:`u^{1-\alpha} / (1 - \alpha)` (:math:`\log u` for
  :math:`\alpha = 1`); maximising the total utility over a ball gives
  :math:`d = \sum_t w_t g_t` with :math:`w > 0` solving

  .. math::

     G w = w^{-1/\alpha}
     \quad\Longleftrightarrow\quad
     \langle g_t, d \rangle = w_t^{-1/\alpha} \;\; \text{for every task}

  (Ban & Ji 2024, eq. 4), so every task improves. :math:`\alpha = 1` is
  proportional fairness, the Nash bargaining system of :func:`mtgrad.nash_mtl`
  (without its clipping); :math:`\alpha \to \infty` tends to max-min
  fairness (MGDA-like), :math:`\alpha \to 0` to the plain sum of utilities.
  Scaling :math:`J` by :math:`c` scales :math:`d` by
  :math:`c^{(1-\alpha)/(1+\alpha)}`, so only :math:`\alpha = 1` is invariant
  to rescaling each loss.

  The reference code solves the system with SciPy's ``least_squares`` on
  the CPU from :math:`w = 1/T`. Here it is solved on ``G`` in JAX by a
  damped Newton method on the strictly convex :math:`F(w) = \frac12 w^\top
  G w - \sum_t h(w_t)`, :math:`h' = w^{-1/\alpha}`, in scale-free variables
  (see :mod:`mtgrad._src.solvers.nash`), warm-started from the previous
  solution when built with ``num_tasks``.

  Args:
    alpha: the fairness parameter, ``alpha > 0``. May be traced
      (``optax.inject_hyperparams``): no Python control flow depends on it.
    max_norm: if given and positive, the weights are rescaled so that
      :math:`\lVert d \rVert \le` ``max_norm`` (the authors' experiments
      clip the gradient norm to 1, see the warning). ``None`` (default, the
      paper) or ``0``: no clipping.
    num_tasks: ``T``; optional. Given, the state records the weights and the
      solver is warm-started from the previous solution.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves: one
      problem per block (see :func:`mtgrad.from_weighting`).
    max_iters: Newton-step budget; ``None`` for 50.
    tol: tolerance on the solver's residual, the estimated largest relative
      error of the weights; ``None`` for about ``1.2e-3`` in float32.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its state's
    ``weighting_state`` is a :class:`FairGradState` with the solver report
    in ``info``.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.fairgrad(alpha=2.0)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 4.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].round(4)  # orthogonal tasks: w_t = ||g_t||^(-4/3)
    Array([1.  , 0.63], dtype=float32)
    >>> bool(state.weighting_state.info.converged)
    True

  References:
    Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024
    (arXiv:2402.15638), github.com/OptMN-Lab/fairgrad.

  Warning:
    The authors' code multiplies the update by ``T`` and clips its norm to
    1 (on the shared parameters); LibMTL's port does neither. Here the
    update is the paper's :math:`d`; ``max_norm=1.0`` reproduces the
    authors' update whenever their clip acts (:math:`T \lVert d \rVert >
    1`, always for :math:`\alpha = 1`, where :math:`\lVert d \rVert^2 = T`).

  Warning:
    Where no solution exists (a zero gradient, or Pareto-stationary
    gradients) the weights are finite and ``info.converged`` is ``False``:
    a zero gradient gets weight 0 and the other tasks are solved among
    themselves; tasks whose gradients cancel get very large weights whose
    combination nearly vanishes. For :math:`\alpha \ne 1` the system itself
    depends on the gradient norms; with norms many orders of magnitude
    apart the float32 weights of the small tasks lose accuracy, which the
    residual reports.
  """
  _check_concrete("alpha", alpha, 0.0)
  if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 0:
    raise ValueError("mtgrad.fairgrad: alpha must be > 0, got 0.")
  _check_concrete("max_iters", max_iters, 1, integer=True)
  _check_concrete("tol", tol, 0.0)
  if max_norm is not None:
    _check_concrete("max_norm", max_norm, 0.0)

  def init_state(num_tasks):
    previous = None if num_tasks is None else jnp.zeros(num_tasks, jnp.float32)
    return FairGradState(previous=previous, info=SolverInfo.initial())

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key, num_tasks
    init = None if state.previous is None else state.previous.astype(gram.dtype)
    solution, info = solver.solve_fair(gram, alpha, init, max_iters=max_iters, tol=tol)
    weights = solution
    if max_norm is not None:
      weights = solution * solver.clip_factor(gram, solution, max_norm)
    previous = None if state.previous is None else solution
    return weights, FairGradState(previous=previous, info=info)

  return base.from_weighting(
    weighting,
    name="fairgrad",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_state,
    blocks=blocks,
  )
