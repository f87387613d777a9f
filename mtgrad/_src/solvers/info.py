"""Convergence report shared by every iterative solver."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SolverInfo(NamedTuple):
  """What an iterative solver reports; exposed as ``state.weighting_state.info``.

  Attributes:
    iterations: iterations run (int32).
    residual: the solver's optimality measure at exit (float32), e.g. a KKT
      or duality-gap residual; NaN when the input had NaN.
    converged: whether ``residual`` met the tolerance within the iteration
      budget (bool). ``False`` is reported, never hidden.
  """

  iterations: jax.Array  # [] int32
  residual: jax.Array  # [] float32
  converged: jax.Array  # [] bool

  @classmethod
  def initial(cls) -> SolverInfo:
    """The value before any solve (fixed dtypes, so states pass lax.cond)."""
    return cls(
      iterations=jnp.zeros([], jnp.int32),
      residual=jnp.zeros([], jnp.float32),
      converged=jnp.zeros([], bool),
    )


class SolverState(NamedTuple):
  """Weighting state of the methods whose only state is a solver's report.

  Attributes:
    info: the :class:`SolverInfo` of the last solve (one per block when
      block-wise; for several solves in one step, the merged report).
  """

  info: SolverInfo

  @classmethod
  def initial(cls, num_tasks: int | None = None) -> SolverState:
    """The state before the first solve; an ``init_state`` for
    :func:`mtgrad.from_weighting` (it does not depend on ``T``)."""
    del num_tasks
    return cls(info=SolverInfo.initial())


def default_max_iters(num_tasks: int) -> int:
  """The active-set solvers' iteration budget when ``max_iters`` is ``None``:
  ``4 T + 20`` (each iteration adds or drops one task from the support)."""
  return 4 * num_tasks + 20
