"""Per-task losses and stacked per-task gradients in one call."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def value_and_jacobian(
  fn: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  r"""Like :func:`jax.value_and_grad`, for a function returning ``T`` losses.

  ``fn(*args)`` returns the ``[T]`` vector of task losses (or ``(losses,
  aux)`` with ``has_aux``). The returned function computes the losses with
  one forward pass (:func:`jax.vjp`) and the per-task gradients with ``T``
  backward passes batched by :func:`jax.vmap`, stacked on a leading task
  axis: the *task-gradient pytree* every mtgrad transform consumes.

  .. math::

     J = \left[\nabla_\theta L_1; \dots; \nabla_\theta L_T\right]

  When each task has its own batch (multi-input multi-task learning), map a
  scalar loss over tasks instead; the result has the same layout::

      losses, task_grads = jax.vmap(
          jax.value_and_grad(task_loss), in_axes=(None, 0)
      )(params, task_batches)  # task_batches: leading axis T

  Args:
    fn: function whose output is a ``[T]`` floating-point vector (or a pair
      ``(losses, aux)`` with ``has_aux=True``).
    argnums: which positional argument(s) to differentiate, as in
      :func:`jax.grad`.
    has_aux: whether ``fn`` returns ``(losses, aux)``.

  Returns:
    A function with ``fn``'s arguments returning ``(losses, jacobian)`` (or
    ``((losses, aux), jacobian)``), where ``jacobian`` has the structure of
    the differentiated argument(s) with a leading ``T`` axis on every leaf (a
    tuple of such trees when ``argnums`` is a sequence).

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> def task_losses(params, x):
    ...   pred = x @ params["w"]
    ...   return jnp.stack([jnp.sum(pred**2), jnp.sum(pred)])
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> losses, grads = mtgrad.value_and_jacobian(task_losses)(params, jnp.eye(2))
    >>> losses
    Array([5., 3.], dtype=float32)
    >>> grads["w"]
    Array([[2., 4.],
           [1., 1.]], dtype=float32)
  """
  single = isinstance(argnums, int)
  argnums_tuple = (argnums,) if single else tuple(argnums)

  def wrapped(*args, **kwargs):
    for i in argnums_tuple:
      if i >= len(args):
        raise ValueError(
          f"mtgrad.value_and_jacobian: argnums={argnums} but only {len(args)}"
          " positional arguments were given."
        )
    diff_args = tuple(args[i] for i in argnums_tuple)

    def partial_fn(*diff):
      full = list(args)
      for i, value in zip(argnums_tuple, diff, strict=True):
        full[i] = value
      return fn(*full, **kwargs)

    if has_aux:
      losses, vjp_fn, aux = jax.vjp(partial_fn, *diff_args, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(partial_fn, *diff_args)
    if not isinstance(losses, jax.Array) or losses.ndim != 1:
      shape = getattr(losses, "shape", type(losses).__name__)
      raise ValueError(
        "mtgrad.value_and_jacobian: fn must return a [T] vector of task "
        f"losses{' (first element of its output, has_aux=True)' if has_aux else ''}; "
        f"got {shape}."
      )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
      raise ValueError(
        f"mtgrad.value_and_jacobian: the losses must be floating point, got {losses.dtype}."
      )
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    jacobian = jax.vmap(vjp_fn)(basis)
    jacobian = jacobian[0] if single else jacobian
    return ((losses, aux) if has_aux else losses), jacobian

  return wrapped
