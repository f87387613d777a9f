"""The ``mtgrad`` command: compare balancing methods on built-in problems.

    mtgrad compare [--problem NAME[,NAME]|default|all] [--methods m1,m2|all]
                   [--size tiny|default|paper] [--steps N] [--seed S] [--out DIR]

Every registry method (new ones join automatically) is trained, chained
before Adam, on the same problem, data and initialisation; each problem
prints a table of per-task metrics, Delta_m% against equal weighting
(``sum``) and the jitted step time, and ``--out`` receives ``results.json``
and the figures. See ``mtgrad compare --help``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

import jax

from mtgrad._src import registry
from mtgrad._src.compare import plots
from mtgrad._src.compare import problems
from mtgrad._src.compare import report
from mtgrad._src.compare import runner
from mtgrad._src.compare.problem import SIZES
from mtgrad._src.compare.problems import DEFAULT
from mtgrad._src.compare.problems import PROBLEMS
from mtgrad._src.compare.progress import Progress

README_FIGURES = {"toy": "trajectories", "regression2": "delta_m"}
"""The figures ``--figures DIR`` writes, by problem: ``DIR/compare_<problem>.png``."""
README_DPI = 60  # keeps the 30-panel toy figure under 200 KB


def _methods(text: str) -> tuple[str, ...]:
  names = registry.names() if text == "all" else tuple(m for m in text.split(",") if m)
  for name in names:
    registry.info(name)  # a clear error for unknown names
  if "sum" not in names:  # the baseline of Delta_m%
    names = ("sum", *names)
  return names


def _problems(text: str) -> tuple[str, ...]:
  if text == "default":
    return DEFAULT
  if text == "all":
    return problems.available()
  names = tuple(p for p in text.split(",") if p)
  unknown = [p for p in names if p not in PROBLEMS]
  if unknown or not names:
    raise ValueError(
      f"mtgrad compare: unknown problem {', '.join(map(repr, unknown))}; known: "
      f"{', '.join(PROBLEMS)}, default ({', '.join(DEFAULT)}), all."
    )
  return names


def compare(args: argparse.Namespace) -> int:
  """Runs ``mtgrad compare``; returns the exit status (1 if a method failed)."""
  started = time.perf_counter()
  methods = _methods(args.methods)
  names = _problems(args.problem)
  out = pathlib.Path(args.out) if args.out else None
  draw = out is not None and not args.no_plots
  if draw or args.figures:
    plots.require_matplotlib()  # fail before training, not after
  built = [PROBLEMS[name](args.size, args.seed) for name in names]
  results: dict = {
    "meta": {
      "seed": args.seed,
      "size": args.size,
      "steps": args.steps,
      "methods": list(methods),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "machine": platform.machine(),
    },
    "problems": {},
  }
  failed = []
  for problem in built:
    problem_start = time.perf_counter()
    steps = args.steps or problem.steps
    bar = Progress(
      problem.name,
      len(methods) + (problem.num_tasks if problem.single_task else 0),
      enabled=not args.no_progress,
    )
    rows = []
    for i, method in enumerate(methods):
      bar.update(i, method)
      rows.append(runner.train(problem, method, steps, args.seed))
    stl = None
    if problem.single_task:
      bar.update(len(methods), "single-task baselines")
      stl = runner.single_task(problem, steps, args.seed)
    bar.close()
    report.add_scores(problem, rows, stl)
    print(report.format_table(problem, rows, stl))
    print(flush=True)
    failed += [f"{problem.name}/{r['method']}" for r in rows if r["error"]]
    entry = {
      "description": problem.description,
      "tasks": list(problem.task_names),
      "metric": problem.metric,
      "higher_is_better": list(problem.higher_is_better),
      "steps": steps,
      "learning_rate": problem.learning_rate,
      "results": rows,
      "single_task": stl,
    }
    if problem.pareto_front is not None:
      entry["pareto_front"] = problem.pareto_front.tolist()
    if draw:
      written = plots.write_all(problem, rows, out)
      entry["plots"] = [p.name for p in written]
    if args.figures and problem.name in README_FIGURES:
      figures = pathlib.Path(args.figures)
      figures.mkdir(parents=True, exist_ok=True)
      target = figures / f"compare_{problem.name}.png"
      if README_FIGURES[problem.name] == "trajectories":
        plots.toy_trajectories(problem, rows, target, dpi=README_DPI)
      else:
        plots.delta_m_bars(problem, rows, target)
    entry["wall_s"] = time.perf_counter() - problem_start
    results["problems"][problem.name] = entry
  results["meta"]["wall_s"] = time.perf_counter() - started
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.compact(results)))
    count = sum(len(e.get("plots", [])) for e in results["problems"].values())
    figures = f" and {count} figures" if count else ""
    print(f"wrote {out / 'results.json'}{figures}", flush=True)
  wall = results["meta"]["wall_s"]
  print(f"total {int(wall // 60)}m{wall % 60:04.1f}s", file=sys.stderr)
  if failed:
    print(f"mtgrad compare: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


def parser() -> argparse.ArgumentParser:
  """The ``mtgrad`` argument parser."""
  top = argparse.ArgumentParser(prog="mtgrad", description=__doc__.splitlines()[0])
  sub = top.add_subparsers(dest="command", required=True)
  cmp = sub.add_parser(
    "compare",
    help="train every balancing method on built-in problems",
    description=(
      "Train every registry method on built-in problems (no download) and print, per "
      "problem, each task's metric, Delta_m% against equal weighting and the step time."
    ),
  )
  cmp.add_argument(
    "--problem",
    default="default",
    help=(
      f"comma-separated from {', '.join(PROBLEMS)}; 'default' ({', '.join(DEFAULT)}), or "
      "'all' (those whose data are installed: qm9 needs pip install qm9pack)"
    ),
  )
  cmp.add_argument("--methods", default="all", help="comma-separated names, or 'all' (default)")
  cmp.add_argument(
    "--size",
    default="default",
    choices=SIZES,
    help="tiny: a smoke test in seconds; default: a few minutes; paper: longer runs (the toy's "
    "35,000 steps of Nash-MTL, 4x the steps elsewhere)",
  )
  cmp.add_argument("--steps", type=int, default=None, help="override every problem's steps")
  cmp.add_argument("--seed", type=int, default=0)
  cmp.add_argument(
    "--out",
    default="mtgrad-compare",
    help="directory for results.json and the figures ('' for none; default: %(default)s)",
  )
  cmp.add_argument("--no-plots", action="store_true", help="write results.json only")
  cmp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  cmp.add_argument(
    "--figures",
    default=None,
    metavar="DIR",
    help="also write the README's figures (compare_toy.png, compare_regression2.png) to DIR",
  )
  return top


def main(argv: Sequence[str] | None = None) -> int:
  """The console entry point ``mtgrad``."""
  p = parser()
  args = p.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    p.error("--steps must be positive")
  return compare(args)


if __name__ == "__main__":
  raise SystemExit(main())
