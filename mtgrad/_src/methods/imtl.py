"""IMTL: the hybrid of IMTL-L and IMTL-G (Liu et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src.methods import _trainable
from mtgrad._src.methods.imtl_g import _imtl_g_weights
from mtgrad._src.methods.imtl_l import check_learning_rate
from mtgrad._src.methods.imtl_l import default_optimizer
from mtgrad._src.methods.imtl_l import init_log_scales
from mtgrad._src.methods.imtl_l import loss_scales_step


class IMTLState(NamedTuple):
  """Weighting state of :func:`imtl` (``state.weighting_state``).

  Attributes:
    log_scales: IMTL-L's trainable ``s`` (``[T]`` float32, init 0; the loss
      scales are :math:`e^{s_t}`) and its optimizer's state.
    rank: numerical rank of the cosine matrix at the last update (see
      :class:`mtgrad.IMTLGState`).
  """

  log_scales: _trainable.Trainable
  rank: jax.Array  # [] int32


def imtl(
  learning_rate: float | jax.Array = 0.025,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_tasks: int | None = None,
  rcond: float | jax.Array = 1e-5,
) -> base.BalancingTransformation:
  r"""IMTL: IMTL-G's equal projections on the gradients of IMTL-L's scaled losses.

  The paper's hybrid (its Algorithm 1). IMTL-L scales each loss by a learned
  :math:`e^{s_t}` (:func:`mtgrad.imtl_l`): the scaled loss is
  :math:`e^{s_t} L_t - s_t`, whose parameter gradient is
  :math:`\tilde g_t = e^{s_t} g_t` (the :math:`-s_t` term has none). IMTL-G
  (:func:`mtgrad.imtl_g`) then balances those scaled gradients: with
  :math:`E = \operatorname{diag}(e^{s})` and :math:`\tilde G = E G E`,

  .. math::

     \alpha = \frac{\tilde v}{\sum_t \tilde v_t}, \quad
     \tilde v = \tilde G^{+} \sqrt{\operatorname{diag} \tilde G}, \qquad
     d = \sum_t \alpha_t \tilde g_t = \sum_t \alpha_t e^{s_t} g_t ,

  so the weights on the raw gradients are :math:`w_t = \alpha_t e^{s_t}`.
  ``s`` is then stepped along :math:`e^{s_t} L_t - 1` with its own optimizer,
  exactly as in :func:`mtgrad.imtl_l` (same default: ``optax.adam(0.025)``).
  The Gram matrix is computed once, on the raw gradients, and scaled by
  :math:`E` on both sides: no second pass over the gradients.

  The unit vectors :math:`u_t` do not depend on the scales, so the
  *direction* of ``d`` is IMTL-G's on the raw gradients; the scales change
  its length, through IMTL-G's normalisation :math:`\sum_t \alpha_t = 1` on
  the scaled gradients: every unit gradient gets the projection
  :math:`1 / \sum_t \tilde v_t` with
  :math:`\tilde v_t = (K^{+}\mathbf{1})_t / (e^{s_t}\lVert g_t\rVert)` (``K``
  the cosine matrix). With :math:`e^{s_t} \approx 1/L_t` (IMTL-L
  converged) that is :math:`\tilde v_t \propto L_t / \lVert g_t\rVert`: the
  length no longer depends on how each loss is scaled. The paper's other
  half of the hybrid, the task-specific parameters trained on the scaled
  losses alone, is what :func:`mtgrad.imtl_l` does to the gradients it is
  given.

  Args:
    learning_rate: learning rate of the default optimizer of ``s`` (ignored
      when ``optimizer`` is given).
    optimizer: the optax optimizer of ``s``; default
      ``optax.adam(learning_rate)``.
    num_tasks: ``T`` (required: ``s`` is kept in the state).
    rcond: IMTL-G's relative eigenvalue cutoff of the cosine matrix (see
      :func:`mtgrad.imtl_g`; may be traced).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; its ``weighting_state`` is an :class:`IMTLState`.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.imtl(num_tasks=2)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> losses = jnp.array([2.0, 0.5])
    >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), losses=losses)
    >>> updates["w"], state.weights  # s = 0 at the first step: IMTL-G
    (Array([0.75, 0.75], dtype=float32), Array([0.75, 0.25], dtype=float32))
    >>> state.weighting_state.log_scales.value.round(4)  # one Adam step along e^s L - 1
    Array([-0.025,  0.025], dtype=float32)

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021 (openreview.net/forum?id=IMPnRXEWpvr),
    Section 3.3 and Algorithm 1.

  Warning:
    The paper computes IMTL-G on the gradients with respect to the shared
    *features*, applies :math:`\alpha` to the shared parameters only, and
    trains each task's own parameters on its scaled loss
    :math:`e^{s_t} L_t` (weight :math:`e^{s_t}`, not :math:`\alpha_t e^{s_t}`);
    here the weights :math:`\alpha_t e^{s_t}` apply to whatever task
    gradients are given (pass the shared parameters' gradients to ``imtl``
    and the heads' to :func:`mtgrad.imtl_l` with the same losses for the
    paper's split). The paper trains ``s`` with the network's optimizer;
    here ``s`` has its own (default above). IMTL-G's closed form becomes a
    pseudo-inverse of the cosine matrix (see :func:`mtgrad.imtl_g` for what
    that means for dependent gradients and for :math:`\sum_t \tilde v_t \le 0`).
    A NaN loss gives a NaN weight.
  """
  base.require_num_tasks(num_tasks, "imtl")
  check_learning_rate("imtl", learning_rate)
  if isinstance(rcond, (int, float)) and not isinstance(rcond, bool) and not 0 <= rcond < 1:
    raise ValueError(f"mtgrad.imtl: rcond must be in [0, 1), got {rcond!r}.")
  opt = _trainable.resolve_optimizer(optimizer, default_optimizer(learning_rate))

  def init_state(num_tasks):
    return IMTLState(log_scales=init_log_scales(opt, num_tasks), rank=jnp.zeros([], jnp.int32))

  def weighting(gram, losses, state, key, *, num_tasks):
    del key, num_tasks
    scales, log_scales = loss_scales_step(opt, state.log_scales, losses)
    scales = scales.astype(gram.dtype)
    scaled_gram = gram * scales[:, None] * scales[None, :]
    alpha, rank = _imtl_g_weights(scaled_gram, jnp.asarray(rcond, gram.dtype))
    return alpha * scales, IMTLState(log_scales=log_scales, rank=rank)

  return base.from_weighting(
    weighting,
    name="imtl",
    needs="gram",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
