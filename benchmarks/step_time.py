"""Per-step time of every balancing transform, next to the Gram pass.

For each ``T`` the script builds one task-gradient pytree and times, side by
side in one run, ``gram`` alone, ``gram`` + ``combine``, and the jitted
``update`` of every requested registry method. The difference between a
method's time and ``gram + combine`` is the cost of its weighting (solver
included) and of anything else it reads.

    python benchmarks/step_time.py --tasks 2,10,40 --params 2000000
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gram_combine

import mtgrad
from mtgrad._src import registry


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="2,10,40")
  parser.add_argument("--params", type=int, default=2_000_000)
  parser.add_argument("--methods", default="all")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  methods = registry.names() if args.methods == "all" else tuple(args.methods.split(","))
  task_counts = [int(t) for t in args.tasks.split(",")]

  rows = []
  for t in task_counts:
    grads = gram_combine.make_task_grads(t, args.params, jnp.float32)
    params = jax.tree.map(lambda x: x[0], grads)
    losses = jnp.linspace(1.0, 2.0, t)
    timed = {
      "gram": gram_combine.median_seconds(jax.jit(mtgrad.gram), grads, repeats=args.repeats),
      "gram + combine": gram_combine.median_seconds(
        jax.jit(gram_combine.gram_then_combine), grads, repeats=args.repeats
      ),
    }
    for name in methods:
      tx = registry.info(name).make(t, key=0)
      state = tx.init(params)
      step = jax.jit(lambda g, s, tx=tx, p=params, ls=losses: tx.update(g, s, p, losses=ls))
      timed[name] = gram_combine.median_seconds(step, grads, state, repeats=args.repeats)
    floor = timed["gram + combine"]
    print(f"\nT={t}, {args.params / 1e6:.1f}M params ({jax.devices()[0].device_kind})")
    print(f"  {'transform':<18} {'ms':>9} {'x gram+combine':>15}")
    for name, seconds in timed.items():
      print(f"  {name:<18} {seconds * 1e3:9.2f} {seconds / floor:15.2f}")
      rows.append({"tasks": t, "name": name, "ms": seconds * 1e3, "ratio": seconds / floor})
  return rows


if __name__ == "__main__":
  main()
