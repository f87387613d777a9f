"""Tree kernels: the only code that touches the task axis of a pytree.

A *task-gradient pytree* has the structure of the parameters and a leading
task axis ``T`` on every leaf (``[T, *leaf_shape]``). Everything here works
leaf by leaf: the tree is never ravelled into one ``[T, D]`` copy, so the
memory traffic is one read of the gradients for :func:`gram` and one for
:func:`combine`, which is the floor for any method that needs both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Blocks = None | str | Any | Callable[[Any], Any]
"""Block specification: ``None`` (whole tree), ``"leaf"`` (one block per
leaf), a pytree of hashable labels with the params structure, or a callable
that maps params (or their ``jax.ShapeDtypeStruct``) to such a pytree."""

Selection = None | Any | Callable[..., Any]
"""Leaf selection: ``None`` (every leaf), a pytree of bools with the params
structure, a callable ``(path, leaf) -> bool`` or a callable
``params -> pytree of bools``."""


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def accumulation_dtype(*dtypes) -> jnp.dtype:
  """The dtype in which reductions over gradients run: float32 or wider."""
  return jnp.result_type(jnp.float32, *dtypes)


def num_tasks(task_grads: Any) -> int:
  """Returns the task count ``T`` shared by every leaf of ``task_grads``.

  Raises a ``ValueError`` at trace time naming the offending leaf when the
  tree is empty, a leaf has no leading axis, the leading axes disagree, or a
  leaf is not floating point.

  Args:
    task_grads: params-structured pytree, every leaf ``[T, *leaf_shape]``.

  Returns:
    The number of tasks ``T`` (a Python int).

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> mtgrad.num_tasks({"w": jnp.zeros((3, 4, 5)), "b": jnp.zeros((3, 5))})
    3
  """
  leaves = jax.tree_util.tree_leaves_with_path(task_grads)
  if not leaves:
    raise ValueError("mtgrad: the task-gradient pytree has no leaves.")
  counts: dict[int, str] = {}
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"mtgrad: task gradients must be floating point; leaf {_path_str(path)} has dtype {dtype}."
      )
    if len(shape) == 0:
      raise ValueError(
        f"mtgrad: every task-gradient leaf needs a leading task axis [T, ...];"
        f" leaf {_path_str(path)} is a scalar. Stack the per-task gradients"
        " (jax.vmap / mtgrad.value_and_jacobian) before the transform."
      )
    counts.setdefault(shape[0], _path_str(path))
  if len(counts) > 1:
    described = ", ".join(f"{p}: T={t}" for t, p in counts.items())
    raise ValueError(
      "mtgrad: task-gradient leaves disagree on the leading task axis "
      f"({described}). Every leaf must be [T, *param_shape] with the same T."
    )
  return next(iter(counts))


def check_matches_params(task_grads: Any, params: Any) -> None:
  """Raises if ``task_grads`` is not ``params`` with one leading task axis."""
  grads_def = jax.tree.structure(task_grads)
  params_def = jax.tree.structure(params)
  if grads_def != params_def:
    raise ValueError(
      "mtgrad: task gradients and params have different tree structures:\n"
      f"  task_grads: {grads_def}\n  params:     {params_def}"
    )
  for (path, g), p in zip(
    jax.tree_util.tree_leaves_with_path(task_grads),
    jax.tree.leaves(params),
    strict=True,
  ):
    if tuple(jnp.shape(g)[1:]) != tuple(jnp.shape(p)):
      raise ValueError(
        f"mtgrad: leaf {_path_str(path)} has task-gradient shape "
        f"{jnp.shape(g)} but param shape {jnp.shape(p)}; expected "
        f"[T, *{tuple(jnp.shape(p))}] (a leading task axis on every leaf)."
      )


def _as_matrix(leaf: jax.Array) -> jax.Array:
  # A reshape of one leaf is free (no copy); only ever done per leaf.
  return leaf.reshape(leaf.shape[0], -1)


def _leaf_gram(leaf: jax.Array) -> jax.Array:
  rows = _as_matrix(leaf)
  return lax.dot_general(
    rows,
    rows,
    (((1,), (1,)), ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=accumulation_dtype(leaf.dtype),
  )


def _leaf_sq_norms(leaf: jax.Array) -> jax.Array:
  rows = _as_matrix(leaf).astype(accumulation_dtype(leaf.dtype))
  return jnp.sum(rows * rows, axis=1)


def gram(task_grads: Any) -> jax.Array:
  """The ``[T, T]`` Gram matrix ``G = J J^T`` of the task gradients.

  Computed as a sum of per-leaf contractions, accumulated in float32 or wider
  (bfloat16 and float16 inputs included), at the highest matmul precision.

  Args:
    task_grads: params-structured pytree, every leaf ``[T, *leaf_shape]``.

  Returns:
    ``[T, T]`` array in the accumulation dtype (float32, or float64 for
    float64 inputs).

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> grads = {"a": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "b": jnp.ones((2, 1))}
    >>> mtgrad.gram(grads)
    Array([[2., 2.],
           [2., 3.]], dtype=float32)
  """
  num_tasks(task_grads)
  return sum(_leaf_gram(leaf) for leaf in jax.tree.leaves(task_grads))


def sq_norms(task_grads: Any) -> jax.Array:
  """The ``[T]`` squared norms ``||g_t||^2``: the Gram diagonal, at ``T``
  times less arithmetic than :func:`gram`."""
  num_tasks(task_grads)
  return sum(_leaf_sq_norms(leaf) for leaf in jax.tree.leaves(task_grads))


def block_ids(blocks: Blocks, tree: Any) -> tuple[tuple[int, ...], tuple[Hashable, ...]]:
  """Assigns every leaf of ``tree`` to a block.

  Args:
    blocks: ``None`` (one block), ``"leaf"`` (one block per leaf), a pytree of
      hashable labels with the structure of ``tree``, or a callable returning
      such a pytree when given ``tree``.
    tree: params (or task gradients with the task axis removed, as
      ``jax.ShapeDtypeStruct``).

  Returns:
    ``(ids, labels)``: the block index of each leaf in ``jax.tree.leaves``
    order, and the label of each block, in order of first appearance.
  """
  leaves = jax.tree.leaves(tree)
  if blocks is None:
    return (0,) * len(leaves), (None,)
  if isinstance(blocks, str):
    if blocks != "leaf":
      raise ValueError(
        f"mtgrad: blocks must be None, 'leaf', a pytree of labels or a "
        f"callable; got the string {blocks!r}."
      )
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return tuple(range(len(leaves))), tuple(paths)
  labels_tree = blocks(tree) if callable(blocks) else blocks
  try:
    labels = jax.tree.structure(tree).flatten_up_to(labels_tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "mtgrad: the block labels must have the params structure "
      f"({jax.tree.structure(tree)}); got {labels_tree!r}."
    ) from err
  order: dict[Hashable, int] = {}
  ids = tuple(order.setdefault(label, len(order)) for label in labels)
  return ids, tuple(order)


def _takes_path_and_leaf(fn: Callable[..., Any]) -> bool:
  # Two positional parameters: a per-leaf predicate, as for
  # jax.tree_util.tree_map_with_path. One: a tree-level callable returning a
  # mask, as tree.block_ids and optax.masked take them.
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  try:
    signature.bind(None, None)
  except TypeError:
    return False
  try:
    signature.bind(None)
  except TypeError:
    return True
  return False


def select_leaves(selection: Selection, params: Any, method: str = "mtgrad") -> tuple[bool, ...]:
  """Which leaves of ``params`` (in ``jax.tree.leaves`` order) ``selection`` marks.

  Raises ``ValueError`` for a selection without the params structure, with
  a label that is not a bool, or that selects nothing.
  """
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  if selection is None:
    return (True,) * len(leaves_with_path)
  if isinstance(selection, str):
    raise ValueError(
      f"{method}: the selection of the parameters on which the task gradients are "
      "measured must be a pytree of bools, a callable (path, leaf) -> bool or None; "
      f"got {selection!r}."
    )
  if callable(selection) and _takes_path_and_leaf(selection):
    labels = [selection(path, leaf) for path, leaf in leaves_with_path]
  else:
    mask = selection(params) if callable(selection) else selection
    try:
      labels = jax.tree.structure(params).flatten_up_to(mask)
    except (ValueError, TypeError) as err:
      raise ValueError(
        f"{method}: the selection must have the params structure "
        f"({jax.tree.structure(params)}); got {mask!r}."
      ) from err
  marks = []
  for (path, _), label in zip(leaves_with_path, labels, strict=True):
    if not isinstance(label, (bool, np.bool_)):
      raise ValueError(
        f"{method}: the selection must mark every leaf with True or False; leaf "
        f"{jax.tree_util.keystr(path)} got {label!r}."
      )
    marks.append(bool(label))
  if not any(marks):
    raise ValueError(
      f"{method}: the selection selects no parameter; at least one leaf (usually the last "
      "shared layer) is needed to measure the task gradients on."
    )
  return tuple(marks)


def params_like(task_grads: Any) -> Any:
  """``task_grads`` without the task axis, as ``jax.ShapeDtypeStruct``s."""
  return jax.tree.map(
    lambda g: jax.ShapeDtypeStruct(jnp.shape(g)[1:], jnp.result_type(g)),
    task_grads,
  )


def block_gram(task_grads: Any, blocks: Blocks = "leaf") -> jax.Array:
  """One ``[T, T]`` Gram matrix per block: ``[B, T, T]``.

  Args:
    task_grads: params-structured pytree, every leaf ``[T, *leaf_shape]``.
    blocks: see :func:`block_ids`; default one block per leaf.

  Returns:
    ``[B, T, T]`` in the accumulation dtype; blocks in order of first
    appearance in ``jax.tree.leaves`` order. The sum over blocks is
    :func:`gram`.
  """
  return _per_block(task_grads, blocks, _leaf_gram)


def block_sq_norms(task_grads: Any, blocks: Blocks = "leaf") -> jax.Array:
  """Per-block squared norms ``[B, T]``: the diagonals of :func:`block_gram`."""
  return _per_block(task_grads, blocks, _leaf_sq_norms)


def _per_block(task_grads, blocks, leaf_fn) -> jax.Array:
  num_tasks(task_grads)
  ids, labels = block_ids(blocks, params_like(task_grads))
  sums: list[Any] = [0] * len(labels)
  for block, leaf in zip(ids, jax.tree.leaves(task_grads), strict=True):
    sums[block] = sums[block] + leaf_fn(leaf)
  return jnp.stack(sums)


def task_sum(fn: Callable[..., jax.Array], *stacked: jax.Array) -> jax.Array:
  """``sum_t fn(stacked[0][t], stacked[1][t], ...)``, one fused pass.

  The ``T`` slices are taken and summed at trace time, so XLA compiles one
  elementwise fusion that reads each input once (an upcast or a product
  with a weight inside ``fn`` fuses too). XLA's reduction over a leading
  axis ran 50-1000x slower on CPU, and broadcasting ``fn`` over the whole
  stack before slicing fell off the same cliff for ``T`` around 20 or more
  (benchmarks/gram_combine.py and step_time.py).

  Args:
    fn: elementwise function of one slice of each stacked input.
    *stacked: arrays with the same leading task axis ``T``.

  Returns:
    The sum over tasks of ``fn`` on each task's slices.
  """
  out = fn(*(s[0] for s in stacked))
  for t in range(1, stacked[0].shape[0]):
    out = out + fn(*(s[t] for s in stacked))
  return out


def _leaf_combine(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  acc = accumulation_dtype(leaf.dtype, weights.dtype)
  # The upcast happens inside the fusion (no float32 copy of a bfloat16
  # leaf), and there is no reduced-precision matmul path on accelerators.
  return task_sum(lambda w, g: w * g.astype(acc), weights.astype(acc), leaf).astype(leaf.dtype)


def combine(task_grads: Any, weights: jax.Array, *, blocks: Blocks = None) -> Any:
  """The weighted sum ``sum_t w_t g_t`` of the task gradients.

  Args:
    task_grads: params-structured pytree, every leaf ``[T, *leaf_shape]``.
    weights: ``[T]``, or ``[B, T]`` with ``blocks`` (one row per block).
    blocks: ``None`` for one weight vector, otherwise the block specification
      that produced the rows of ``weights`` (see :func:`block_ids`).

  Returns:
    The params-structured update (no task axis), each leaf with its input
    dtype; accumulated in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> grads = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> mtgrad.combine(grads, jnp.array([0.5, 0.5]))
    {'w': Array([2., 3.], dtype=float32)}
  """
  t = num_tasks(task_grads)
  weights = jnp.asarray(weights)
  if blocks is None:
    if weights.shape != (t,):
      raise ValueError(
        f"mtgrad.combine: expected weights of shape ({t},) for T={t} tasks, got {weights.shape}."
      )
    return jax.tree.map(lambda g: _leaf_combine(weights, g), task_grads)
  ids, labels = block_ids(blocks, params_like(task_grads))
  if weights.shape != (len(labels), t):
    raise ValueError(
      f"mtgrad.combine: expected block weights of shape ({len(labels)}, {t}) "
      f"for {len(labels)} blocks and T={t} tasks, got {weights.shape}."
    )
  leaves, treedef = jax.tree.flatten(task_grads)
  combined = [_leaf_combine(weights[block], leaf) for block, leaf in zip(ids, leaves, strict=True)]
  return jax.tree.unflatten(treedef, combined)


__all__: Sequence[str] = (
  "block_gram",
  "block_ids",
  "block_sq_norms",
  "combine",
  "gram",
  "num_tasks",
  "sq_norms",
)
