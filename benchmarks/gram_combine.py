"""Times mtgrad's two passes over the Jacobian against the memory-bandwidth floor.

Every Gram-based method reads the stacked task gradients twice: once for the
``[T, T]`` Gram matrix and once for the weighted combine. This script times
``gram`` + ``combine`` on a large task-gradient pytree and compares it with
the floor of two streaming reads at this machine's read bandwidth, measured
in the same run (a jitted sum over a buffer of the same size).

    python benchmarks/gram_combine.py --tasks 10 --params 4000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import mtgrad


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_task_grads(num_tasks: int, num_params: int, dtype) -> dict:
  """A transformer-like pytree: a few big matrices, biases and norms."""
  shapes = {
    "embed": (num_params // 4 // 256, 256),
    "block": {
      "attn": (num_params // 4 // 512, 512),
      "mlp_in": (num_params // 8 // 128, 128),
      "mlp_out": (num_params // 8 // 128, 128),
      "bias": (1024,),
      "scale": (),
    },
    "head": (num_params // 4 // 64, 64),
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = [
    jax.random.normal(k, (num_tasks, *s), jnp.float32).astype(dtype)
    for k, s in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, grads)


def gram_then_combine(task_grads):
  """The work every Gram-based method does, with a cheap stand-in weighting."""
  g = mtgrad.gram(task_grads)
  t = g.shape[0]
  return mtgrad.combine(task_grads, jnp.linalg.solve(g + jnp.eye(t), jnp.ones(t)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("--params", type=int, default=4_000_000)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  task_grads = make_task_grads(args.tasks, args.params, jnp.dtype(args.dtype))
  leaves = jax.tree.leaves(task_grads)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  num_params = sum(x[0].size for x in leaves)

  # Read bandwidth: one streaming reduction over a buffer of the same size.
  buffer = jnp.ones((nbytes // 4,), jnp.float32)
  read_time = median_seconds(jax.jit(jnp.sum), buffer, repeats=args.repeats)
  bandwidth = nbytes / read_time
  floor = 2 * nbytes / bandwidth

  weights = jnp.linspace(0.5, 1.5, args.tasks)
  gram_time = median_seconds(jax.jit(mtgrad.gram), task_grads, repeats=args.repeats)
  combine_time = median_seconds(jax.jit(mtgrad.combine), task_grads, weights, repeats=args.repeats)

  both_time = median_seconds(jax.jit(gram_then_combine), task_grads, repeats=args.repeats)
  tx = mtgrad.inverse_norm()
  params = jax.tree.map(lambda x: x[0], task_grads)
  state = tx.init(params)
  transform_time = median_seconds(
    jax.jit(lambda g, s: tx.update(g, s)[0]), task_grads, state, repeats=args.repeats
  )

  results = {
    "device": jax.devices()[0].device_kind,
    "tasks": args.tasks,
    "params": num_params,
    "dtype": args.dtype,
    "gradient_MB": nbytes / 1e6,
    "read_bandwidth_GBps": bandwidth / 1e9,
    "two_pass_floor_ms": floor * 1e3,
    "gram_ms": gram_time * 1e3,
    "combine_ms": combine_time * 1e3,
    "gram_plus_combine_ms": both_time * 1e3,
    "ratio_to_floor": both_time / floor,
    "inverse_norm_transform_ms": transform_time * 1e3,
  }
  print(f"mtgrad gram + combine benchmark on {results['device']} ({jax.default_backend()})")
  print(
    f"  T={args.tasks}, {num_params / 1e6:.2f}M params in {len(leaves)} leaves, {args.dtype}: "
    f"{nbytes / 1e6:.0f} MB of task gradients"
  )
  print(f"  measured read bandwidth       {bandwidth / 1e9:8.2f} GB/s")
  print(f"  floor (two reads)             {floor * 1e3:8.2f} ms")
  print(f"  gram                          {gram_time * 1e3:8.2f} ms")
  print(f"  combine                       {combine_time * 1e3:8.2f} ms")
  print(f"  gram + weights + combine      {both_time * 1e3:8.2f} ms")
  print(f"  ratio to the two-pass floor   {both_time / floor:8.2f} x")
  print(f"  inverse_norm transform        {transform_time * 1e3:8.2f} ms")
  return results


if __name__ == "__main__":
  main()
