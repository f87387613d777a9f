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
