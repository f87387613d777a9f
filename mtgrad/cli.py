"""The ``mtgrad`` command: compare balancing methods on built-in problems.

    mtgrad compare [--problem NAME] [--methods m1,m2|all] [--steps N] [--seed S] [--out DIR]

Every registry method is trained on the same problem, data and
initialisation; the table reports each task's test loss, the multi-task
score Delta_m% against equal weighting (``sum``), and the jitted step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtgrad._src import registry
from mtgrad._src.jacobian import value_and_jacobian


@dataclasses.dataclass(frozen=True)
class Problem:
  """A multi-task problem: parameters, per-task train and test losses."""

  name: str
  description: str
  num_tasks: int
  init: Callable[[jax.Array], dict]
  train_losses: Callable[[dict, jax.Array], jax.Array]  # (params, key) -> [T]
  test_losses: Callable[[dict], jax.Array]  # params -> [T]
  learning_rate: float


def gradnorm_regression(num_tasks: int, scales: Sequence[float], seed: int) -> Problem:
  """GradNorm's synthetic regression (Chen et al. 2018, section 4).

  ``y_t = sigma_t tanh((B + eps_t) x)`` with ``B`` shared (entries
  ``N(0, 10)``) and ``eps_t`` task-specific (``N(0, 3.5)``): tasks share a
  basis but have output scales ``sigma_t`` far apart, so an unbalanced sum is
  dominated by the large-scale task. A ReLU MLP trunk with one linear head
  per task; losses are mean squared errors divided by ``sigma_t^2`` on the
  test set (so every task counts equally in the table).
  """
  in_dim, out_dim, hidden, num_train, num_test = 250, 100, 100, 2000, 1000
  rng = np.random.default_rng(seed)
  basis = rng.normal(0.0, np.sqrt(10.0), (out_dim, in_dim))
  eps = rng.normal(0.0, np.sqrt(3.5), (num_tasks, out_dim, in_dim))
  sigmas = np.asarray(scales, np.float64)
  x = rng.normal(size=(num_train + num_test, in_dim))
  y = np.stack(
    [s * np.tanh(x @ (basis + e).T / np.sqrt(in_dim)) for s, e in zip(sigmas, eps, strict=True)]
  )
  x_train, x_test = jnp.asarray(x[:num_train], jnp.float32), jnp.asarray(x[num_train:], jnp.float32)
  y_train = jnp.asarray(y[:, :num_train], jnp.float32)  # [T, N, out]
  y_test = jnp.asarray(y[:, num_train:], jnp.float32)
  norm = jnp.asarray(sigmas**2, jnp.float32)

  def init(key):
    sizes = [in_dim, hidden, hidden, hidden]
    keys = jax.random.split(key, len(sizes) + num_tasks)
    trunk = [
      {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
      for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]
    heads = jax.random.normal(keys[-1], (num_tasks, hidden, out_dim)) * np.sqrt(1.0 / hidden)
    return {"trunk": trunk, "heads": heads}

  def predict(params, x):
    h = x
    for layer in params["trunk"]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
    return jnp.einsum("nh,tho->tno", h, params["heads"])

  def train_losses(params, key):
    idx = jax.random.choice(key, num_train, (128,), replace=False)
    pred = predict(params, x_train[idx])
    return jnp.mean((pred - y_train[:, idx]) ** 2, axis=(1, 2))

  def test_losses(params):
    return jnp.mean((predict(params, x_test) - y_test) ** 2, axis=(1, 2)) / norm

  scale_text = ", ".join(f"{s:g}" for s in scales)
  return Problem(
    name=f"regression{num_tasks}",
    description=f"GradNorm synthetic regression, {num_tasks} tasks, output scales {scale_text}",
    num_tasks=num_tasks,
    init=init,
    train_losses=train_losses,
    test_losses=test_losses,
    learning_rate=1e-3,
  )


PROBLEMS: dict[str, Callable[[int], Problem]] = {
  "regression2": lambda seed: gradnorm_regression(2, (1.0, 100.0), seed),
  "regression10": lambda seed: gradnorm_regression(
    10, tuple(float(s) for s in np.geomspace(1.0, 100.0, 10)), seed
  ),
}


def train(problem: Problem, method: str, steps: int, seed: int) -> dict:
  """Trains ``problem`` with ``method`` chained before Adam; returns metrics."""
  tx = optax.chain(
    registry.info(method).make(problem.num_tasks, key=seed), optax.adam(problem.learning_rate)
  )
  params = problem.init(jax.random.key(seed))

  def step(carry, key):
    params, state = carry
    losses, grads = value_and_jacobian(problem.train_losses)(params, key)
    updates, state = tx.update(grads, state, params, losses=losses)
    weights = optax.tree.get(state, "weights")
    return (optax.apply_updates(params, updates), state), (losses, weights)

  @jax.jit
  def run(params, keys):
    (params, _), (losses, weights) = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses, weights

  keys = jax.random.split(jax.random.key(seed + 1), steps)
  compiled = run.lower(params, keys).compile()  # keep compilation out of the step time
  start = time.perf_counter()
  final, losses, weights = jax.block_until_ready(compiled(params, keys))
  elapsed = time.perf_counter() - start
  test = np.asarray(problem.test_losses(final), np.float64)
  return {
    "method": method,
    "test_losses": test.tolist(),
    "final_train_losses": np.asarray(losses[-1]).tolist(),
    "step_ms": 1e3 * elapsed / steps,
    "final_weights": None if weights is None else np.asarray(weights[-1]).tolist(),
    "finite": bool(np.all(np.isfinite(test))),
  }


def delta_m(results: Sequence[float], baseline: Sequence[float]) -> float:
  """Delta_m% (Maninis et al. 2019) for lower-is-better metrics."""
  r, b = np.asarray(results), np.asarray(baseline)
  return float(100.0 * np.mean((r - b) / b))


def format_table(problem: Problem, rows: list[dict]) -> str:
  base = next((r for r in rows if r["method"] == "sum"), rows[0])
  shown = min(problem.num_tasks, 4)
  header = ["method"] + [f"task{t}" for t in range(shown)]
  if problem.num_tasks > shown:
    header.append("...")
  header += ["mean", f"Δm% vs {base['method']}", "step ms"]
  lines = []
  for r in rows:
    losses = r["test_losses"]
    cells = [r["method"]] + [f"{v:.4f}" for v in losses[:shown]]
    if problem.num_tasks > shown:
      cells.append("")
    cells += [
      f"{np.mean(losses):.4f}",
      f"{delta_m(losses, base['test_losses']):+.1f}",
      f"{r['step_ms']:.2f}",
    ]
    lines.append(cells)
  widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
  out = [f"{problem.description} (test MSE / sigma_t^2, lower is better)", fmt(header)]
  out.append("  ".join("-" * w for w in widths))
  out += [fmt(c) for c in lines]
  return "\n".join(out)


def compare(args: argparse.Namespace) -> int:
  methods = registry.names() if args.methods == "all" else tuple(args.methods.split(","))
  for m in methods:
    registry.info(m)  # clear error for unknown names
  if "sum" in registry.names() and "sum" not in methods:
    methods = ("sum", *methods)
  problems = list(PROBLEMS) if args.problem == "all" else [args.problem]
  out_dir = pathlib.Path(args.out) if args.out else None
  report = {}
  for name in problems:
    problem = PROBLEMS[name](args.seed)
    rows = []
    for i, method in enumerate(methods):
      print(f"[{name}] {i + 1}/{len(methods)} {method} ...", file=sys.stderr, flush=True)
      rows.append(train(problem, method, args.steps, args.seed))
    print(format_table(problem, rows))
    print()
    report[name] = {"description": problem.description, "steps": args.steps, "results": rows}
  if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir / 'results.json'}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="mtgrad", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  cmp = sub.add_parser("compare", help="train every method on a built-in problem")
  cmp.add_argument("--problem", default="all", choices=[*PROBLEMS, "all"])
  cmp.add_argument("--methods", default="all", help="comma-separated names, or 'all'")
  cmp.add_argument("--steps", type=int, default=500)
  cmp.add_argument("--seed", type=int, default=0)
  cmp.add_argument("--out", default=None, help="directory for results.json")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be positive")
  return compare(args)


if __name__ == "__main__":
  raise SystemExit(main())
