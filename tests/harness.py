"""The property harness: a catalogue of inputs and one checker per property.

Every registry method is run on every catalogue case; each declared property
must hold on all of them, and each undeclared one must fail on at least one
(so the registry cannot claim too little or too much).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtgrad._src import registry

# ---------------------------------------------------------------- pytrees


def _flat_shapes() -> dict:
  return {"w": (7,)}


def _nested_shapes() -> dict:
  # Matrices, vectors, a scalar parameter, a list and a tuple container.
  return {
    "dense": {"kernel": (3, 2), "bias": (2,)},
    "scale": (),
    "heads": [(4,), ((1, 1),)],
  }


TREE_SHAPES: dict[str, dict] = {"flat": _flat_shapes(), "nested": _nested_shapes()}


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def tree_from_matrix(matrix: np.ndarray, shapes) -> tuple[dict, dict]:
  """Splits a ``[T, D]`` matrix into (task_grads, params) with ``shapes``."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  sizes = [math.prod(s) for s in leaves]
  if matrix.shape[1] != sum(sizes):
    raise ValueError(f"matrix has {matrix.shape[1]} columns, shapes need {sum(sizes)}")
  t = matrix.shape[0]
  offsets = np.cumsum([0, *sizes])
  grads = [
    jnp.asarray(matrix[:, a:b].reshape((t, *s)), jnp.float32)
    for a, b, s in zip(offsets[:-1], offsets[1:], leaves, strict=True)
  ]
  params = [jnp.zeros(s, jnp.float32) for s in leaves]
  return jax.tree.unflatten(treedef, grads), jax.tree.unflatten(treedef, params)


def tree_dim(shapes) -> int:
  return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


def flatten_tasks(task_tree) -> np.ndarray:
  """``[T, D]`` float64 matrix of a task-gradient pytree."""
  leaves = jax.tree.leaves(task_tree)
  t = leaves[0].shape[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)


def flatten_update(update) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(update)])


# ---------------------------------------------------------------- catalogue


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  matrix: np.ndarray  # [T, D] float64
  losses: np.ndarray  # [T]
  shapes: dict

  @property
  def num_tasks(self) -> int:
    return self.matrix.shape[0]


def _matrices(dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  normal = lambda t: rng.standard_normal((t, dim))
  base = normal(2)
  g = normal(1)[0]
  return {
    "random_T2": normal(2),
    "random_T3": normal(3),
    "random_T5": normal(5),
    "rank_deficient_T5": rng.standard_normal((5, 2)) @ base,
    "zero_row_T3": np.stack([normal(1)[0], np.zeros(dim), normal(1)[0]]),
    "duplicated_T3": np.stack([g, g, normal(1)[0]]),
    "opposite_T2": np.stack([g, -g]),
    "opposite_scaled_T3": np.stack([g, -2.5 * g, normal(1)[0]]),
    "conflicting_T3": np.stack([g, -g + 0.1 * normal(1)[0], -g + 0.1 * normal(1)[0]]),
    "scale_spread_T3": normal(3) * np.array([[1e-10], [1.0], [1e10]]),
    "scale_spread_T5": normal(5) * np.array([[1e-8], [1e-3], [1.0], [1e4], [1e9]]),
    "tiny_T3": normal(3) * 1e-10,
    "huge_T3": normal(3) * 1e10,
  }


@functools.cache
def catalogue() -> tuple[Case, ...]:
  rng = np.random.default_rng(20261121)
  cases = []
  for tree_name, shapes in TREE_SHAPES.items():
    for name, matrix in _matrices(tree_dim(shapes), rng).items():
      # The flat tree repeats a few T=3 cases: every (T, tree) pair costs a
      # compilation per method, and the nested tree carries the whole list.
      if tree_name == "flat" and name not in FLAT_CASES:
        continue
      losses = rng.uniform(0.5, 2.0, size=matrix.shape[0])
      cases.append(Case(f"{tree_name}/{name}", matrix, losses, shapes))
  return tuple(cases)


FLAT_CASES = ("random_T3", "zero_row_T3", "conflicting_T3", "scale_spread_T3")


def zero_case(num_tasks: int = 3) -> Case:
  shapes = TREE_SHAPES["nested"]
  return Case("zeros", np.zeros((num_tasks, tree_dim(shapes))), np.ones(num_tasks), shapes)


# ---------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
  updates: list[np.ndarray]  # one flat update per step
  weights: list[np.ndarray | None]
  magnitude: list[float]  # the float32 rounding scale of each update


def _second_step(matrix: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  # A deterministic second step (a stateful method must behave on a sequence).
  mixed = 0.8 * matrix + 0.3 * np.roll(matrix, 1, axis=1)
  return mixed, 0.7 * losses


Method = str | registry.MethodInfo
"""A registry name, or a :class:`MethodInfo` not (yet) in the registry."""


def _info(method: Method) -> registry.MethodInfo:
  return registry.info(method) if isinstance(method, str) else method


@functools.cache
def jitted(method: Method, num_tasks: int, key: int = 0) -> tuple[Callable, Callable, Callable]:
  """``(tx, init, step)`` for a default instance, each jitted once per method.

  One jitted ``update`` called step by step (rather than a jitted sequence of
  updates) compiles the method once per input shape.
  """
  tx = _info(method).make(num_tasks, key=key)
  step = jax.jit(
    lambda grads, state, params, losses: tx.update(grads, state, params, losses=losses)
  )
  return tx, jax.jit(tx.init), step


def run(method: Method, case: Case, *, key: int = 0, matrix=None, losses=None) -> Outcome:
  """Two updates of a fresh instance of ``method`` on ``case`` (optionally transformed)."""
  matrix = case.matrix if matrix is None else matrix
  losses = case.losses if losses is None else losses
  _, init, step = jitted(method, matrix.shape[0], key)
  second_matrix, second_losses = _second_step(matrix, losses)
  grads1, params = tree_from_matrix(matrix, case.shapes)
  grads2, _ = tree_from_matrix(second_matrix, case.shapes)
  state = init(params)
  updates, weights = [], []
  for grads, step_losses in ((grads1, losses), (grads2, second_losses)):
    update, state = step(grads, state, params, jnp.asarray(step_losses, jnp.float32))
    updates.append(flatten_update(update))
    w = getattr(state, "weights", None)
    weights.append(None if w is None else np.asarray(w, np.float64))
  magnitude = []
  for m, w in zip((matrix, second_matrix), weights, strict=True):
    norms = np.linalg.norm(m, axis=1)
    scale = np.abs(w) @ norms if w is not None and w.ndim == 1 else np.sum(norms)
    magnitude.append(float(scale) if np.isfinite(scale) else np.inf)
  return Outcome(updates, weights, magnitude)


# ---------------------------------------------------------------- properties

RTOL = 1e-4  # float32 with a few thousand roundings to spare


def _close(a: np.ndarray, b: np.ndarray, magnitude: float) -> bool:
  return bool(np.all(np.abs(a - b) <= RTOL * (np.abs(b) + magnitude) + 1e-30))


_BASE_RUNS: dict[tuple[Method, str], Outcome] = {}


def base_run(method: Method, case: Case) -> Outcome:
  """``run(method, case)``, computed once per method and case."""
  if (method, case.name) not in _BASE_RUNS:
    _BASE_RUNS[method, case.name] = run(method, case)
  return _BASE_RUNS[method, case.name]


def check_properties(method: Method) -> dict[str, dict[str, str]]:
  """``{property: {case name: why it fails}}`` for every property and case.

  ``method`` may be a :class:`MethodInfo` that is not registered, e.g. a new
  method being written in a notebook: its declared properties must come out
  with no failures, the undeclared ones with at least one.
  """
  return {
    prop: {
      case.name: why for case in catalogue() if (why := violation(method, prop, case)) is not None
    }
    for prop in registry.PROPERTIES
  }


def violation(method: Method, prop: str, case: Case) -> str | None:
  """``None`` if ``prop`` holds for ``method`` on ``case``, else why not."""
  base = base_run(method, case)
  seq = [(case.matrix, case.losses), _second_step(case.matrix, case.losses)]
  if prop == registry.LINEAR:
    for step, (update, w, (m, _)) in enumerate(zip(base.updates, base.weights, seq, strict=True)):
      if w is None:
        return "state has no weights"
      if not _close(update, w @ m, base.magnitude[step]):
        return f"step {step}: update != sum_t w_t g_t"
    return None
  if prop == registry.NON_CONFLICTING:
    for step, (update, (m, _)) in enumerate(zip(base.updates, seq, strict=True)):
      norms = np.linalg.norm(m, axis=1)
      dots = m @ update
      # The rounding scale of a float32 d is eps * sum_k |w_k| ||g_k||
      # (cancellation can make ||d|| much smaller than that).
      bound = -RTOL * norms * base.magnitude[step]
      if np.any(dots < bound):
        return f"step {step}: <d, g_t> = {dots} (bound {bound})"
    return None
  if prop == registry.PERMUTATION_EQUIVARIANT:
    perm = np.roll(np.arange(case.num_tasks), 1)
    other = run(method, case, matrix=case.matrix[perm], losses=case.losses[perm])
    for step in range(2):
      if not _close(other.updates[step], base.updates[step], base.magnitude[step]):
        return f"step {step}: permuting tasks changed the update"
    return None
  if prop == registry.HOMOGENEOUS:
    for c in (1e-3, 7.0):
      other = run(method, case, matrix=c * case.matrix)
      for step in range(2):
        if not _close(other.updates[step], c * base.updates[step], c * base.magnitude[step]):
          return f"step {step}: d({c} J) != {c} d(J)"
    return None
  if prop == registry.LOSS_SCALE_INVARIANT:
    rng = np.random.default_rng(7)
    c = 10.0 ** rng.uniform(-3, 3, size=case.num_tasks)
    other = run(method, case, matrix=c[:, None] * case.matrix, losses=c * case.losses)
    for step in range(2):
      if not _close(other.updates[step], base.updates[step], base.magnitude[step]):
        return f"step {step}: rescaling task losses changed the update"
    return None
  raise ValueError(f"no checker for property {prop!r}")
