"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers import nash as solver
from mtgrad._src.solvers.info import SolverInfo


class NashMTLState(NamedTuple):
  """Weighting state of :func:`nash_mtl` (``state.weighting_state``).

  Attributes:
    count: updates so far (int32); the weights are recomputed when
      ``count % update_every == 0``.
    alpha: ``[T]`` the bargaining weights of the last solve, before the
      ``max_norm`` clipping (zeros before the first update): reused between
      solves and the warm start of the next one.
    info: the :class:`mtgrad.SolverInfo` of the last solve (kept unchanged
      on the steps that reuse ``alpha``).
  """

  count: jax.Array  # [] int32
  alpha: jax.Array  # [T]
  info: SolverInfo


def _check_concrete(name: str, value, low: float, *, integer: bool = False) -> None:
  # Hyperparameters may be traced (optax.inject_hyperparams): check only
  # Python numbers, never branch on arrays.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if integer and not isinstance(value, int):
    raise ValueError(f"mtgrad.nash_mtl: {name} must be an int, got {value!r}.")
  if not value >= low:
    raise ValueError(f"mtgrad.nash_mtl: {name} must be >= {low}, got {value!r}.")


@jax.jit
def _step(gram, state: NashMTLState, update_every, optim_niter, tol, max_norm):
  """One weighting step; jitted so that eager calls reuse one compilation."""
  previous = state.alpha.astype(gram.dtype)

  def solve(_):
    return solver.solve_fair(gram, 1.0, previous, max_iters=optim_niter, tol=tol)

  def reuse(_):
    return previous, state.info

  recompute = jnp.mod(state.count, jnp.asarray(update_every, jnp.int32)) == 0
  alpha, info = lax.cond(recompute, solve, reuse, None)
  weights = alpha
  if max_norm is not None:
    weights = alpha * solver.clip_factor(gram, alpha, max_norm)
  return weights, NashMTLState(optax.safe_int32_increment(state.count), alpha, info)


def nash_mtl(
  *,
  max_norm: float | jax.Array | None = 1.0,
  update_every: int | jax.Array = 1,
  optim_niter: int | jax.Array = 20,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  tol: float | jax.Array | None = None,
) -> base.BalancingTransformation:
  r"""Nash-MTL: the Nash bargaining solution between the tasks.

  The tasks bargain over an update :math:`d` in a ball, each with utility
  :math:`\langle g_t, d \rangle`; the Nash bargaining solution maximises
  :math:`\sum_t \log \langle g_t, d \rangle`. It is
  :math:`d = \sum_t \alpha_t g_t` with :math:`\alpha > 0` solving

  .. math::

     \alpha \odot (G \alpha) = \mathbf{1}
     \quad\Longleftrightarrow\quad
     \langle g_t, d \rangle = 1 / \alpha_t \;\; \text{for every task,}

  so every task improves (:math:`\langle g_t, d \rangle > 0`), and a task
  with a small gradient gets a large weight. The solution is unique, exists
  unless the task gradients are Pareto stationary, and has
  :math:`\lVert d \rVert^2 = \alpha^\top G \alpha = T`. It depends on the
  gradients only through their directions: scaling :math:`g_t` by
  :math:`c_t > 0` scales :math:`\alpha_t` by :math:`1 / c_t` and leaves
  :math:`d` unchanged (invariant to rescaling any loss, and of degree 0,
  not 1, in :math:`J`).

  The reference code solves a sequence of convex problems with cvxpy/ECOS
  on the CPU. Here the system is solved on ``G`` in JAX by a damped Newton
  method in the scale-free variables :math:`b_t = \alpha_t \lVert g_t
  \rVert`, where it reads :math:`b \odot (K b) = 1` with :math:`K` the
  cosine matrix, warm-started from the previous :math:`\alpha` (see
  :mod:`mtgrad._src.solvers.nash`): gradient norms spanning any range are
  handled exactly, inside ``jit``, with no host round-trip.

  **Clipping.** The reference clips the norm of the resulting parameter
  gradient to ``max_norm`` (``clip_grad_norm_`` on the shared parameters).
  Here the weights are rescaled so that :math:`\lVert d \rVert \le`
  ``max_norm``: the update is :math:`d \min(1, \text{max\_norm} / \lVert d
  \rVert)` and ``state.weights`` are the rescaled weights. Since
  :math:`\lVert d \rVert = \sqrt{T}` at the solution, the default
  ``max_norm=1`` always acts for :math:`T \ge 2` and the update has unit
  norm. ``max_norm=None`` or ``0`` disables it (the paper's :math:`d`).
  Block-wise, each block's update is clipped separately.

  Args:
    max_norm: bound on the update's norm (see above); ``None`` or ``0``: no
      clipping. May be traced.
    update_every: recompute the weights every ``update_every`` updates and
      reuse them in between (the reference's ``update_weights_every``; the
      clipping still uses the current gradients). May be traced.
    optim_niter: Newton-step budget of a solve (the reference's number of
      convex-concave iterations, each a full ECOS solve). A cold start
      takes at most about 10, a warm start a few. May be traced.
    num_tasks: ``T`` (required: the previous weights are kept in the state).
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves: one
      bargaining problem per block (see :func:`mtgrad.from_weighting`).
    tol: tolerance on the solver's residual, the estimated largest relative
      error of the weights; ``None`` for about ``1.2e-3`` in float32.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its state's
    ``weighting_state`` is a :class:`NashMTLState` (one per block when
    block-wise), with the solver report in ``info``.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.nash_mtl(num_tasks=2, max_norm=None)
    >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 0.5]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> state.weights.round(4)  # 1 / ||g_t|| for orthogonal gradients
    Array([0.5, 2. ], dtype=float32)
    >>> updates["w"].round(4), bool(state.weighting_state.info.converged)
    (Array([1., 1.], dtype=float32), True)

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    *Multi-Task Learning as a Bargaining Game*, ICML 2022
    (arXiv:2202.01017), github.com/AvivNavon/nash-mtl.

  Warning:
    Where no bargaining solution exists the weights are still finite and
    ``info.converged`` is ``False`` (the reference keeps its previous
    weights when ECOS fails). A task with a zero gradient gets weight 0 and
    the others are solved among themselves (residual 1). At a
    Pareto-stationary point (:math:`0 \in \operatorname{conv}\{g_t\}`, e.g.
    exactly opposite gradients) the weights of the cancelling tasks grow to
    about :math:`\epsilon^{-1/2}` times :math:`1/\lVert g_t \rVert` and
    their combination nearly cancels; the update is then the bargaining
    direction of the remaining tasks, orthogonal to the cancelling ones,
    up to float rounding. Non-finite gradients give NaN weights; the next
    solve ignores them and starts cold, but with ``update_every > 1`` the
    steps up to it reuse the NaN weights.
  """
  num_tasks = base.require_num_tasks(num_tasks, "nash_mtl")
  _check_concrete("update_every", update_every, 1, integer=True)
  _check_concrete("optim_niter", optim_niter, 1, integer=True)
  _check_concrete("tol", tol, 0.0)
  if max_norm is not None:
    _check_concrete("max_norm", max_norm, 0.0)

  def init_state(num_tasks):
    return NashMTLState(
      count=jnp.zeros([], jnp.int32),
      alpha=jnp.zeros(num_tasks, jnp.float32),
      info=SolverInfo.initial(),
    )

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, key, num_tasks
    return _step(gram, state, update_every, optim_niter, tol, max_norm)

  return base.from_weighting(
    weighting,
    name="nash_mtl",
    needs="gram",
    num_tasks=num_tasks,
    init_state=init_state,
    blocks=blocks,
  )
