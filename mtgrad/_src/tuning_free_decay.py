"""L2 regularisation as an auxiliary loss that must not increase (Su, part 3)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base
from mtgrad._src import tree


def tuning_free_decay(
  *, blocks: tree.Blocks = None, decoupled: bool = False
) -> optax.GradientTransformation:
  r"""Weight decay with no coefficient: :math:`\frac12\lVert\theta\rVert^2` must not grow.

  Su (part 3) treats :math:`\frac12 \lVert \theta \rVert^2` as an auxiliary
  loss of the primary/auxiliary problem (:func:`mtgrad.min_norm`): its
  gradient is :math:`\theta`, and the one-auxiliary closed form turns the
  gradient :math:`g` into

  .. math::

     u = g + \frac{\operatorname{relu}(-\langle g, \theta \rangle)}
                  {\lVert \theta \rVert^2}\, \theta ,
     \qquad \langle u, \theta \rangle = \max(\langle g, \theta \rangle, 0) \ge 0,

  the direction closest to :math:`g` along which a descent step
  :math:`\Delta\theta = -\eta u` does not increase :math:`\lVert \theta
  \rVert` to first order. Where :math:`g` already shrinks the weights
  nothing changes, so there is no decay coefficient to tune.

  **Sign conventions.** The formula acts on a *gradient* (descent is
  :math:`-u`), so the transform goes where the chain holds gradients: right
  after the balancer and before the optimizer::

    tx = optax.chain(
      mtgrad.min_norm(primary=0),   # task gradients -> one gradient
      mtgrad.tuning_free_decay(),   # no task axis: an ordinary transform
      optax.sgd(0.1),               # gradient -> update (-0.1 u)
    )

  With plain SGD the guarantee carries to the step. A preconditioning
  optimizer (Adam) rescales coordinates, so the norm of its update may still
  grow; ``decoupled=True`` instead applies the constraint to the *update*
  (what :func:`optax.apply_updates` adds, :math:`\Delta\theta = u`), placed
  after the optimizer as AdamW decouples its decay:
  :math:`u \leftarrow u - \operatorname{relu}(\langle u, \theta \rangle) /
  \lVert \theta \rVert^2\, \theta`, so that :math:`\langle u, \theta \rangle
  \le 0`.

  ``blocks="leaf"`` constrains every parameter tensor's norm separately (a
  stronger constraint: the whole-model version lets one tensor grow while
  another shrinks); :func:`optax.masked` excludes leaves (biases, norms).
  To keep the balancer's own guarantees exact as well, add
  :math:`\frac12\lVert\theta\rVert^2` as one more auxiliary task of
  :func:`mtgrad.min_norm` instead (its gradient row is ``params``).

  Args:
    blocks: ``None`` (whole model, Su's formula), ``"leaf"`` or a grouping of
      leaves (see :func:`mtgrad.block_ids`): one constraint per block.
    decoupled: ``False`` (default): the input is a gradient (before the
      optimizer); ``True``: the input is an update (after the optimizer).

  Returns:
    An :class:`optax.GradientTransformation` whose ``update`` requires
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, mtgrad
    >>> tx = mtgrad.tuning_free_decay()
    >>> params = {"w": jnp.array([1.0, 0.0])}
    >>> grads = {"w": jnp.array([-1.0, 1.0])}  # descent would grow w
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["w"]  # <u, w> = 0: the first-order growth is removed
    Array([0., 1.], dtype=float32)

  References:
    Su Jianlin, *多任务学习漫谈（三）：分主次之序* (Multi-task learning, part 3:
    primary and auxiliary tasks), kexue.fm/archives/8907, 2022, section
    "正则损失" (regularisation losses).

  Warning:
    Where :math:`\theta = 0` (on a block) the correction is 0 (instead of
    ``0/0``): the norm cannot decrease there anyway.
  """

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
    if params is None:
      raise ValueError(
        "mtgrad.tuning_free_decay needs the params: call tx.update(updates, state, params) "
        "(optax.chain forwards them)."
      )
    leaves, treedef = jax.tree.flatten(updates)
    try:
      param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
      raise ValueError(
        f"mtgrad.tuning_free_decay: params must have the structure of the updates ({treedef})."
      ) from err
    ids, labels = tree.block_ids(blocks, params)
    dots: list[Any] = [0.0] * len(labels)
    sq_norms: list[Any] = [0.0] * len(labels)
    for block, u, p in zip(ids, leaves, param_leaves, strict=True):
      acc = tree.accumulation_dtype(jnp.result_type(u), jnp.result_type(p))
      u, p = jnp.asarray(u, acc), jnp.asarray(p, acc)
      dots[block] = dots[block] + jnp.sum(u * p)
      sq_norms[block] = sq_norms[block] + jnp.sum(p * p)
    coefficients = []
    for dot, sq in zip(dots, sq_norms, strict=True):
      violation = jnp.maximum(dot, 0) if decoupled else jnp.maximum(-dot, 0)
      sign = -1 if decoupled else 1
      coefficients.append(sign * violation * base.safe_reciprocal(jnp.asarray(sq)))
    new_leaves = []
    for block, u, p in zip(ids, leaves, param_leaves, strict=True):
      acc = tree.accumulation_dtype(jnp.result_type(u), jnp.result_type(p))
      corrected = jnp.asarray(u, acc) + coefficients[block].astype(acc) * jnp.asarray(p, acc)
      new_leaves.append(corrected.astype(jnp.result_type(u)))
    return jax.tree.unflatten(treedef, new_leaves), state

  return optax.GradientTransformation(init_fn, update_fn)
