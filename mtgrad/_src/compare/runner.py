"""Train one method on one problem, compiled once and timed apart from compilation."""

from __future__ import annotations

import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtgrad._src import base
from mtgrad._src import registry
from mtgrad._src.compare.problem import Problem
from mtgrad._src.compare.toy import distance_to_front
from mtgrad._src.jacobian import value_and_jacobian
from mtgrad._src.methods.constant import constant

CURVE_POINTS = 100  # training curves are averaged into this many bins
TRAJECTORY_POINTS = 400  # toy trajectories are subsampled to this many points


def balancer(method: str, num_tasks: int, seed: int) -> base.BalancingTransformation:
  """The registry's default instance of ``method`` (seeded when stochastic)."""
  return registry.info(method).make(num_tasks, key=seed)


def _weights(state: Any) -> jax.Array | None:
  """The balancer's ``weights`` (the first transform of the chain)."""
  found = optax.tree_utils.tree_get_all_with_path(state[0], "weights")
  found = [value for _, value in found if value is not None]
  return found[0] if found else None


def _bin(values: np.ndarray, points: int) -> tuple[list[int], np.ndarray]:
  """Averages ``values`` (``[steps, ...]``) over ``points`` consecutive bins;
  returns each bin's last step (1-based) and the means."""
  chunks = np.array_split(np.arange(values.shape[0]), min(points, values.shape[0]))
  return [int(c[-1]) + 1 for c in chunks], np.stack([values[c].mean(0) for c in chunks])


def train(
  problem: Problem,
  method: str,
  steps: int,
  seed: int,
  *,
  transform: base.BalancingTransformation | None = None,
) -> dict:
  """Trains ``problem`` with ``method`` chained before Adam.

  Each method compiles once per problem, before the clock starts: the toy's
  whole run (``lax.scan`` over the steps, ``vmap`` over the starts) is one
  program; for networks the per-task gradients are compiled once per
  problem and shared by every method, and the method's update is its own
  program. Every exception is caught and reported in the row's ``error``,
  so one failing method never stops a comparison.

  Args:
    problem: the problem.
    method: a registry name (the row's label when ``transform`` is given).
    steps: training steps.
    seed: seeds the initialisation, the minibatches and stochastic methods.
    transform: use this balancing transform instead of the registry's.

  Returns:
    A JSON-serialisable row: ``metrics`` (``[T]``, averaged over starts),
    ``step_ms``, ``compile_s`` (the method's own program), ``final_weights``,
    ``final_train_losses``, ``curves`` (binned training losses and weights),
    ``finite``, ``error``;
    for problems with starting points also ``metrics_per_start`` and
    ``trajectories``; with a known Pareto front ``front_distance``.
  """
  row: dict[str, Any] = {"method": method, "error": None}
  try:
    row.update(_train(problem, method, steps, seed, transform))
  except Exception as e:  # a failing method is a row, not a crash
    message = str(e).strip().splitlines()
    row["error"] = f"{type(e).__name__}: {message[0] if message else ''}"[:300]
    row["traceback"] = traceback.format_exc(limit=-3)
    row["finite"] = False
  return row


def _train(problem, method, steps, seed, transform) -> dict:
  if transform is None:
    transform = balancer(method, problem.num_tasks, seed)
  tx = optax.chain(transform, optax.adam(problem.learning_rate))
  if problem.starts is None:
    out = _run_stepwise(problem, tx, steps, seed)
  else:
    out = _run_scanned(problem, tx, steps, seed)
  return _summarise(problem, steps, **out)


def _step_fn(problem: Problem, tx: optax.GradientTransformationExtraArgs):
  """One balanced Adam step: ``(params, state, losses, grads) -> (params,
  state, weights)``."""

  def apply(params, state, losses, grads):
    updates, state = tx.update(grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, _weights(state)

  return apply


def _run_scanned(problem, tx, steps, seed) -> dict:
  """The toy: ``lax.scan`` over the steps, ``vmap`` over the starts, one
  program (the model is two numbers: compiling it is free, and the scan
  makes 20,000 tiny steps fast)."""
  apply = _step_fn(problem, tx)
  record_params = problem.landscape is not None

  def one_run(params, keys):
    def step(carry, key):
      params, state = carry
      losses, grads = value_and_jacobian(problem.train_losses)(params, key)
      new_params, state, weights = apply(params, state, losses, grads)
      return (new_params, state), (losses, weights, params if record_params else None)

    (params, _), records = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, problem.evaluate(params), records

  run = jax.vmap(one_run, in_axes=(0, None))
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  start = time.perf_counter()
  compiled = jax.jit(run).lower(problem.starts, keys).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  final, metrics, (losses, weights, path) = jax.block_until_ready(compiled(problem.starts, keys))
  elapsed = time.perf_counter() - start
  out = {
    "metrics": np.asarray(metrics, np.float64),  # [S, T]
    "losses": np.asarray(losses, np.float64).mean(0),  # [steps, T], mean over the starts
    "weights": None if weights is None else np.asarray(weights, np.float64).mean(0),
    "compile_s": compile_s,
    "elapsed": elapsed,
  }
  if record_params:
    # the scan records the parameters before each step; the path ends at the final ones
    path = np.asarray(jax.tree.leaves(path)[0], np.float64)  # [S, steps, 2]
    final = np.asarray(jax.tree.leaves(final)[0], np.float64)[:, None]  # [S, 1, 2]
    keep = np.unique(np.linspace(0, steps - 1, TRAJECTORY_POINTS).astype(int))
    out["trajectories"] = np.concatenate([path[:, keep], final], axis=1)
  return out


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_functions(problem: Problem) -> tuple[Callable, Callable]:
  """The jitted functions every method shares, compiled once per problem:
  ``(params, key) -> (losses, task_grads, next_key)`` and ``evaluate``."""
  if problem not in _SHARED:

    def losses_and_jacobian(params, key):
      key, batch_key = jax.random.split(key)
      losses, grads = value_and_jacobian(problem.train_losses)(params, batch_key)
      return losses, grads, key

    _SHARED[problem] = (jax.jit(losses_and_jacobian), jax.jit(problem.evaluate))
  return _SHARED[problem]


def _run_stepwise(problem, tx, steps, seed) -> dict:
  """Networks: the per-task gradients are one program compiled once per
  problem, the method's update (with Adam) one program per method, and a
  Python loop calls both. Compiling the network's backward pass into every
  method's program would cost more than the whole run."""
  params = problem.init(jax.random.key(seed))
  key = jax.random.key(seed + 1)
  grads_fn, evaluate = shared_functions(problem)
  losses, grads, _ = grads_fn(params, key)  # compiles once per problem
  state = tx.init(params)
  start = time.perf_counter()
  apply = jax.jit(_step_fn(problem, tx)).lower(params, state, losses, grads).compile()
  compile_s = time.perf_counter() - start
  history = []
  start = time.perf_counter()
  for _ in range(steps):
    losses, grads, key = grads_fn(params, key)
    params, state, weights = apply(params, state, losses, grads)
    history.append((losses, weights))
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start
  weights = None if history[0][1] is None else np.stack([np.asarray(w) for _, w in history])
  return {
    "metrics": np.asarray(evaluate(params), np.float64),
    "losses": np.stack([np.asarray(step_losses, np.float64) for step_losses, _ in history]),
    "weights": weights,
    "compile_s": compile_s,
    "elapsed": elapsed,
  }


def _summarise(problem, steps, metrics, losses, weights, compile_s, elapsed, trajectories=None):
  """The JSON row from the raw arrays (``metrics`` ``[S, T]`` with starts)."""
  row: dict[str, Any] = {}
  if metrics.ndim == 2:
    row["metrics_per_start"] = metrics.tolist()
    if problem.pareto_front is not None:
      row["front_distance"] = distance_to_front(metrics, problem.pareto_front).tolist()
    metrics = metrics.mean(0)
  row.update(
    metrics=metrics.tolist(),
    step_ms=1e3 * elapsed / steps,
    compile_s=compile_s,
    final_train_losses=losses[-1].tolist(),
  )
  curve_steps, curve_losses = _bin(losses, CURVE_POINTS)
  row["curves"] = {"step": curve_steps, "train_losses": curve_losses.tolist(), "weights": None}
  row["final_weights"] = None
  if weights is not None:
    # block-wise methods hold [B, T] weights: the curve shows their mean over blocks
    weights = np.asarray(weights, np.float64).reshape(steps, -1, problem.num_tasks).mean(1)
    row["final_weights"] = weights[-1].tolist()
    row["curves"]["weights"] = _bin(weights, CURVE_POINTS)[1].tolist()
  if trajectories is not None:
    row["trajectories"] = trajectories.tolist()
  row["finite"] = bool(np.all(np.isfinite(metrics)) and np.all(np.isfinite(losses)))
  return row


def single_task(problem: Problem, steps: int, seed: int) -> dict:
  """One single-task model per task (the same network trained on that task's
  loss alone); the row's metric for task ``t`` comes from model ``t``."""
  rows = [
    train(problem, f"single-task {t}", steps, seed, transform=constant(weights=w))
    for t, w in enumerate(jnp.eye(problem.num_tasks, dtype=jnp.float32))
  ]
  errors = [r["error"] for r in rows if r["error"]]
  if errors:
    return {"method": "single-task", "error": errors[0], "finite": False}
  return {
    "method": "single-task",
    "error": None,
    "metrics": [r["metrics"][t] for t, r in enumerate(rows)],
    "step_ms": float(np.mean([r["step_ms"] for r in rows])),
    "compile_s": float(sum(r["compile_s"] for r in rows)),
    "finite": all(r["finite"] for r in rows),
  }
