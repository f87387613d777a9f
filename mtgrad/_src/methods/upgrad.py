"""UPGrad: unconflicting projection of gradients (Quinton & Rey 2024, torchjd)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src import tree
from mtgrad._src.solvers import dual_cone
from mtgrad._src.solvers.info import SolverState


def check_hyperparameters(method: str, **values) -> None:
  """Checks the Python-number hyperparameters (traced ones pass unchecked)."""
  for name, value in values.items():
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if name == "max_iters":
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"mtgrad.{method}: max_iters must be a positive int, got {value!r}.")
    elif not value >= 0:
      raise ValueError(f"mtgrad.{method}: {name} must be >= 0, got {value!r}.")


def check_pref_vector(pref_vector, method: str) -> jax.Array | None:
  """``None`` or a ``[T]`` float array."""
  if pref_vector is None:
    return None
  pref = jnp.asarray(pref_vector)
  if pref.ndim != 1 or pref.shape[0] < 1:
    raise ValueError(f"mtgrad.{method}: pref_vector must have shape [T], got shape {pref.shape}.")
  if not jnp.issubdtype(pref.dtype, jnp.floating):
    pref = pref.astype(jnp.float32)
  return pref


def preference(pref: jax.Array | None, num_tasks: int, dtype, method: str) -> jax.Array:
  """The preference vector for ``T`` tasks: ``pref`` or the mean ``1/T``."""
  if pref is None:
    return jnp.full(num_tasks, 1 / num_tasks, dtype)
  if pref.shape != (num_tasks,):
    raise ValueError(
      f"mtgrad.{method}: pref_vector has shape {pref.shape} but there are T={num_tasks} tasks."
    )
  return pref.astype(dtype)


def upgrad_weights(
  gram: jax.typing.ArrayLike,
  pref: jax.typing.ArrayLike | None = None,
  *,
  norm_eps: float | jax.Array = 0.0,
  reg_eps: float | jax.Array = 1e-4,
  max_iters: int | jax.Array | None = None,
  tol: float | jax.Array | None = None,
):
  r"""UPGrad weights from a ``[T, T]`` Gram matrix (see :func:`upgrad`).

  Returns:
    ``(weights [T], info)``: :math:`w = \sum_i v^{(i)}` and the merged
    :class:`mtgrad.SolverInfo` of the ``T`` projections.
  """
  gram = jnp.asarray(gram)
  num = gram.shape[0]
  matrix = dual_cone.regularized_gram(gram, norm_eps, reg_eps)
  pref = preference(None if pref is None else jnp.asarray(pref), num, matrix.dtype, "upgrad")
  vs, info = dual_cone.project_weights_many(
    matrix, jnp.diag(pref), max_iters=max_iters, tol=tol
  )  # [T, T]: row i projects p_i g_i
  return jnp.sum(vs, axis=0), info


def upgrad(
  *,
  pref_vector: jax.typing.ArrayLike | None = None,
  norm_eps: float | jax.Array = 0.0,
  reg_eps: float | jax.Array = 1e-4,
  num_tasks: int | None = None,
  blocks: tree.Blocks = None,
  max_iters: int | None = None,
  tol: float | jax.Array | None = None,
) -> base.BalancingTransformation:
  r"""UPGrad: project every task gradient onto the dual cone, then combine.

  The dual cone of the task gradients is :math:`\{x : \langle x, g_t \rangle
  \ge 0 \ \forall t\}`, the directions that conflict with no task. UPGrad
  projects each (weighted) task gradient :math:`p_i g_i` onto it and adds the
  projections. On the Gram matrix (Quinton & Rey 2024, Proposition 1) the
  projection of :math:`J^T u` is :math:`J^T v` with

  .. math::

     v = \operatorname{argmin}_v \; v^T \tilde G v \quad \text{s.t.} \quad
     v \ge u, \qquad \tilde G = G / \operatorname{tr}(G) + \epsilon_{reg} I ,

  so, with :math:`u^{(i)} = p_i e_i` and :math:`p = \mathbb{1}/T` by default,

  .. math::

     w = \sum_{i=1}^T v^{(i)}, \qquad d = \sum_t w_t g_t
       = \sum_i \pi_{\mathcal{C}}(p_i g_i) .

  The ``T`` box-constrained quadratic programs are solved together (one
  ``vmap``) by the exact active-set solver of
  :func:`~mtgrad._src.solvers.dual_cone.project_weights`, which works on the
  cosine matrix, so gradient norms spanning many orders of magnitude are
  handled.

  **No conflict.** Each projection satisfies :math:`\tilde G v^{(i)} \ge 0`,
  so with ``reg_eps = 0`` the update conflicts with no task:
  :math:`\langle d, g_t \rangle = (G w)_t \ge 0`, up to the solver tolerance.
  torchjd's regularisation (kept as the default) weakens this to
  :math:`\langle d, g_t \rangle \ge -\epsilon_{reg} \operatorname{tr}(G)\,
  w_t`: a task whose gradient is small next to the others
  (:math:`\lVert g_t \rVert^2 \lesssim \epsilon_{reg} \operatorname{tr} G`)
  is effectively not protected. Pass ``reg_eps=0`` for the exact guarantee at
  every scale (the solver does not need a positive definite matrix).

  **Cost.** Each projection takes about as many active-set iterations as
  its optimum has variables above their bound, each one ``[T, T]``
  eigendecomposition (batched over the ``T`` projections): negligible for a
  few tasks; with ``T = 40`` conflicting tasks, a few hundred batched
  ``40 x 40`` eigendecompositions (about 0.1 to 0.3 s on a CPU core).

  Properties: linear, permutation-equivariant and positively homogeneous (the
  trace normalisation and the regularisation are scale-free; not with a
  positive ``norm_eps``, see below); non-conflicting up to the
  regularisation. Not invariant to rescaling one task's loss.

  Args:
    pref_vector: ``[T]`` preference weights :math:`p` (torchjd's
      ``pref_vector``); ``None`` for the mean :math:`\mathbb{1}/T`.
    norm_eps: if :math:`\operatorname{tr} G` is below this *absolute*
      threshold the Gram is treated as zero, as torchjd does, and the weights
      are :math:`\max(p, 0)`; default ``0`` (see the warning).
    reg_eps: :math:`\epsilon_{reg}`, relative to the trace (torchjd's
      ``reg_eps``).
    num_tasks: ``T``; optional. Given, the state records the weights.
    blocks: ``None`` (whole model), ``"leaf"`` or a grouping of leaves (see
      :func:`mtgrad.from_weighting`).
    max_iters: iteration budget of each projection; ``None`` for ``4 T + 20``.
    tol: relative KKT tolerance of the solver; ``None`` for 20 machine
      epsilons.

  Returns:
    A :class:`mtgrad.BalancingTransformation`; its
    ``state.weighting_state.info`` reports the ``T`` solves of the last
    update (the most iterations, the worst residual, whether all converged).

  Example:
    >>> import jax.numpy as jnp
    >>> import mtgrad
    >>> tx = mtgrad.upgrad(num_tasks=2, reg_eps=0.0)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> [round(x, 4) for x in updates["w"].tolist()]
    [0.25, 0.75]
    >>> [round(x, 4) for x in state.weights.tolist()]
    [1.0, 0.75]
    >>> bool(state.weighting_state.info.converged)
    True

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024 (arXiv:2406.16232); torchjd's ``UPGrad`` / ``UPGradWeighting``.

  Warning:
    Deviations from torchjd. torchjd's ``norm_eps`` defaults to ``1e-4`` and
    compares the trace with it in absolute terms: below it (gradients with
    :math:`\sum_t \lVert g_t \rVert^2 < 10^{-4}`, common late in training)
    torchjd returns the plain mean, which may conflict, and the method is not
    homogeneous. Here it defaults to ``0`` (only an all-zero Gram falls back,
    where every weighting gives ``d = 0``); ``norm_eps=1e-4`` reproduces
    torchjd. torchjd solves the projections with quadprog in float64 on the
    host; here they are solved in JAX (float32 or the Gram's wider dtype),
    exactly up to ``tol``, on the device. When :math:`\tilde G` is singular
    (only with ``reg_eps=0``: duplicated or dependent gradients) the
    projections ``d`` are unique but the weights need not be; the solver
    returns one optimal ``v``. A zero gradient keeps its weight
    :math:`p_t` (it does not change ``d``).
  """
  check_hyperparameters("upgrad", norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol)
  pref = check_pref_vector(pref_vector, "upgrad")

  def weighting(gram, losses, state, key, *, num_tasks):
    del losses, state, key, num_tasks
    weights, info = upgrad_weights(
      gram, pref, norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol
    )
    return weights, SolverState(info)

  return base.from_weighting(
    weighting,
    name="upgrad",
    needs="gram",
    num_tasks=num_tasks,
    init_state=SolverState.initial,
    blocks=blocks,
  )
