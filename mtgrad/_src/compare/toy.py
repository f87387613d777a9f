r"""The two-objective toy of CAGrad and Nash-MTL: 2-D parameters, analytic losses.

With ``c_+(x_2) = \max(\tanh(x_2/2), 0)`` and ``c_-(x_2) = \max(\tanh(-x_2/2), 0)``:

.. math::

   f_1 &= c_+ \big[\log \max(|\tfrac12(-x_1 - 7) - \tanh(-x_2)|, 5\cdot10^{-6}) + 6\big]
        + c_- \big[((x_1 - 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\big] \\
   f_2 &= c_+ \big[\log \max(|\tfrac12(-x_1 + 3) + \tanh(-x_2) + 2|, 5\cdot10^{-6}) + 6\big]
        + c_- \big[((x_1 + 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\big]

Nash-MTL scales the first loss by 0.1 so the two tasks' scales differ; the
losses here are ``l_1 = 0.1 f_1 + 2.1`` and ``l_2 = f_2 + 21``. The offsets
are FAMO's lower bounds (-21 times each loss's scale): they leave every
gradient and the Pareto set (``x_2 ~ -8.36``, ``-7 <= x_1 <= 7``) unchanged
and make the losses positive, as loss-driven methods need. Adam (learning
rate 1e-3) from the five starting points of Nash-MTL's toy.

References:
  Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
  Multi-task Learning", NeurIPS 2021 (the functions: ``toy.py`` of
  github.com/Cranial-XIX/CAGrad). Navon et al., "Multi-Task Learning as a
  Bargaining Game", ICML 2022 (the 0.1 scale and the five starting points:
  ``experiments/toy`` of github.com/AvivNavon/nash-mtl). Liu, Liu, Stone &
  Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023 (the lower
  bounds ``-21 * scale``: ``experiments/toy/trainer.py`` of
  github.com/Cranial-XIX/FAMO).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mtgrad._src.compare.problem import Problem

SCALE = 0.1
OFFSETS = (21.0 * SCALE, 21.0)
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
_LOWER = 5e-6


def losses(x1, x2, xp=jnp):
  """The two offset losses at ``(x1, x2)`` (arrays of any shape; ``xp`` is
  ``jax.numpy`` or ``numpy``); returns ``(l1, l2)``."""
  up = xp.maximum(xp.tanh(0.5 * x2), 0.0)
  down = xp.maximum(xp.tanh(-0.5 * x2), 0.0)
  t = xp.tanh(-x2)
  log1 = xp.log(xp.maximum(xp.abs(0.5 * (-x1 - 7.0) - t), _LOWER)) + 6.0
  log2 = xp.log(xp.maximum(xp.abs(0.5 * (-x1 + 3.0) + t + 2.0), _LOWER)) + 6.0
  bowl1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  bowl2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  f1 = up * log1 + down * bowl1
  f2 = up * log2 + down * bowl2
  return SCALE * f1 + OFFSETS[0], f2 + OFFSETS[1]


def landscape(points: np.ndarray) -> np.ndarray:
  """``[N, 2]`` parameters -> ``[N, 2]`` losses, in float64 NumPy."""
  points = np.asarray(points, np.float64)
  return np.stack(losses(points[:, 0], points[:, 1], xp=np), axis=-1)


def nondominated(values: np.ndarray) -> np.ndarray:
  """Indices of the rows of ``values`` (``[N, 2]``) that no other row
  dominates, ordered by the first objective."""
  order = np.lexsort((values[:, 1], values[:, 0]))
  second = values[order, 1]
  running = np.minimum.accumulate(second)
  keep = np.concatenate([[True], second[1:] < running[:-1]])
  return order[keep]


def pareto_front(box: float = 10.0, resolution: int = 401, points: int = 1000) -> np.ndarray:
  """The Pareto front in loss space, computed numerically.

  The non-dominated losses of a grid over ``[-box, box]^2``, then of a grid
  as fine over the bounding box of the non-dominated points (padded by two
  coarse cells), thinned to at most ``points`` points evenly spaced along
  the front. Returns ``[K, 2]`` sorted by the first loss.
  """
  lo, hi = np.array([-box, -box]), np.array([box, box])
  for _ in range(2):
    axes = [np.linspace(lo[i], hi[i], resolution) for i in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
    values = landscape(grid)
    keep = nondominated(values)
    cell = (hi - lo) / (resolution - 1)
    lo, hi = grid[keep].min(0) - 2 * cell, grid[keep].max(0) + 2 * cell
  front = values[keep]
  arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(front, axis=0), axis=1))])
  return front[np.unique(np.searchsorted(arc, np.linspace(0.0, arc[-1], points)))]


def distance_to_front(points: np.ndarray, front: np.ndarray) -> np.ndarray:
  """Euclidean distance in loss space from each row of ``points`` (``[N,
  2]``) to the piecewise-linear front (``[K, 2]``, sorted)."""
  a, b = front[:-1], front[1:]  # segments [K-1, 2]
  ab = b - a
  rel = points[:, None, :] - a[None]  # [N, K-1, 2]
  t = np.clip(np.sum(rel * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-30), 0.0, 1.0)
  nearest = a[None] + t[..., None] * ab[None]
  return np.min(np.linalg.norm(points[:, None, :] - nearest, axis=-1), axis=1)


def toy(size: str, seed: int) -> Problem:
  """The toy as a :class:`Problem` (deterministic: ``seed`` is unused)."""
  del seed
  steps = {"tiny": 300, "default": 20_000, "paper": 35_000}[size]

  def task_losses(params, key=None):
    del key
    return jnp.stack(losses(params["x"][0], params["x"][1]))

  front = pareto_front(resolution=101 if size == "tiny" else 401)
  return Problem(
    name="toy",
    description=(
      "CAGrad / Nash-MTL two-objective toy, 2-D parameters, 5 starting points, "
      f"Adam 1e-3 for {steps} steps"
    ),
    task_names=("l1", "l2"),
    metric="final loss, mean over the starts",
    higher_is_better=(False, False),
    init=lambda key: {"x": jnp.zeros(2, jnp.float32)},
    train_losses=task_losses,
    evaluate=task_losses,
    learning_rate=1e-3,
    steps=steps,
    starts={"x": jnp.asarray(STARTS, jnp.float32)},
    pareto_front=front,
    landscape=landscape,
  )
