"""Small jit-able solvers on ``[T, T]`` arrays (bounded loops, convergence info)."""

from mtgrad._src.solvers.info import SolverInfo

__all__ = ("SolverInfo",)
