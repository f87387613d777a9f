"""The record every built-in problem fills in, and the problem sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import numpy as np

Size = Literal["tiny", "default", "paper"]
SIZES: tuple[Size, ...] = ("tiny", "default", "paper")


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Problem:
  """A multi-task problem for ``mtgrad compare``.

  Attributes:
    name: the ``--problem`` name.
    description: one line for the table caption.
    task_names: one short name per task (the table's columns).
    metric: what :attr:`evaluate` returns, for the caption.
    higher_is_better: per task, whether a larger metric is better (enters
      the sign of Delta_m%).
    init: ``key -> params`` (one starting point).
    train_losses: ``(params, key) -> [T]`` training losses of one step.
    evaluate: ``params -> [T]`` the reported metric (test set, or the
      final losses for analytic problems); jit-able.
    learning_rate: Adam's learning rate.
    steps: default number of training steps.
    starts: several starting points (a params pytree with a leading axis):
      every method is run from each, ``vmap``-ed in one program, and the
      metrics are averaged over them.
    pareto_front: ``[K, T]`` points of the Pareto front in loss space, when
      known (the toy): rows then report each start's distance to it.
    single_task: also train one single-task model per task (the STL
      baseline of Delta_m%).
    landscape: ``[N, 2] -> [N, T]`` NumPy losses for 2-D parameters (the
      toy's contour plots), with its plot ``box`` ``(lo, hi)``.
  """

  name: str
  description: str
  task_names: tuple[str, ...]
  metric: str
  higher_is_better: tuple[bool, ...]
  init: Callable[[jax.Array], Any]
  train_losses: Callable[[Any, jax.Array], jax.Array]
  evaluate: Callable[[Any], jax.Array]
  learning_rate: float
  steps: int
  starts: Any = None
  pareto_front: np.ndarray | None = None
  single_task: bool = False
  landscape: Callable[[np.ndarray], np.ndarray] | None = None
  box: tuple[float, float] = (-10.0, 10.0)

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  @property
  def num_starts(self) -> int:
    return 1 if self.starts is None else int(jax.tree.leaves(self.starts)[0].shape[0])
