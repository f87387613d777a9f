"""PCGrad in Gram space against the naive pairwise implementation.

The naive reference does what the PyTorch libraries do (LibMTL, the
authors' code): for each task, project its gradient in turn onto the
normal plane of every other conflicting gradient, on the actual gradient
pytree: about ``2 T (T - 1)`` passes over ``T x params`` numbers. It is
jitted JAX here, so the comparison is algorithm against algorithm.
:func:`mtgrad.pcgrad` reads the gradients twice (one Gram pass, one
combine pass) and runs the projections on ``[T, T]`` arrays.

Both run with the same visiting orders (the naive one takes them
explicitly), and the script checks that they agree.

Usage::

    python benchmarks/pcgrad_gram_space.py --params 2000000 --tasks 2 10 40 --repeats 3
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gram_combine

from mtgrad._src import tree
from mtgrad._src.methods import _coefficients
from mtgrad._src.methods.pcgrad import pcgrad


def naive_pcgrad(task_grads, orders):
  """Sequential PCGrad on the gradient pytree; ``orders[i]`` lists the other
  tasks in the order task ``i`` visits them."""
  num = tree.num_tasks(task_grads)
  sq_norms = tree.sq_norms(task_grads)  # [T], once

  def row(k):
    return jax.tree.map(lambda leaf: lax.dynamic_index_in_dim(leaf, k, keepdims=False), task_grads)

  def one_task(i, total):
    def project(step, g):
      j = orders[i, step]
      g_j = row(j)
      pairs = zip(jax.tree.leaves(g), jax.tree.leaves(g_j), strict=True)
      dot = sum(jnp.sum(a * b) for a, b in pairs)
      coef = jnp.where((dot < 0) & (sq_norms[j] > 0), dot / sq_norms[j], 0)
      return jax.tree.map(lambda a, b: a - coef * b, g, g_j)

    return jax.tree.map(jnp.add, total, lax.fori_loop(0, num - 1, project, row(i)))

  zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), task_grads)
  return lax.fori_loop(0, num, one_task, zeros)


def make_task_grads(key, num_tasks, num_params):
  """A dense-network-like pytree of about ``num_params`` parameters, with
  conflicting task gradients: a shared direction with a random signed
  weight per task, plus independent noise."""
  width = max(1, int((num_params / 4) ** 0.5))
  shapes = {f"layer{k}": {"w": (width, width), "b": (width,)} for k in range(4)}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, 2 * len(leaves) + 1)
  mix = jax.random.uniform(keys[-1], (num_tasks,), minval=-1.0, maxval=1.0)
  out = []
  for k, shape in enumerate(leaves):
    shared = jax.random.normal(keys[2 * k], shape)
    noise = jax.random.normal(keys[2 * k + 1], (num_tasks, *shape))
    out.append(mix.reshape((num_tasks,) + (1,) * len(shape)) * shared[None] + noise)
  return jax.tree.unflatten(treedef, out)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=2_000_000, help="parameters in the pytree")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40], help="values of T")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
  args = parser.parse_args(argv)
  rows = []

  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  header = f"{'T':>4} {'params':>10} {'naive s':>9} {'gram s':>9} {'ratio':>8} {'rel diff':>9}"
  print(header)
  print("-" * len(header))
  for num_tasks in args.tasks:
    task_grads = jax.jit(make_task_grads, static_argnums=(1, 2))(
      jax.random.key(num_tasks), num_tasks, args.params
    )
    num_params = sum(x[0].size for x in jax.tree.leaves(task_grads))
    tx = pcgrad(key=0)
    state = tx.init(jax.tree.map(lambda x: x[0], task_grads))
    gram_fn = jax.jit(lambda g, s, update=tx.update: update(g, s)[0])
    # The orders pcgrad's next update uses: task_orders of the step key.
    orders = _coefficients.task_orders(jax.random.split(state.key)[1], num_tasks)
    naive_fn = jax.jit(naive_pcgrad)

    d_gram, d_naive = gram_fn(task_grads, state), naive_fn(task_grads, orders)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(d_naive))
    diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(d_gram), jax.tree.leaves(d_naive), strict=True)
    )
    if not diff <= 1e-4 * scale:  # float32 rounding only; NaN fails too
      raise SystemExit(f"T={num_tasks}: Gram-space and naive PCGrad differ ({diff / scale:.1e})")
    t_naive = gram_combine.median_seconds(naive_fn, task_grads, orders, repeats=args.repeats)
    t_gram = gram_combine.median_seconds(gram_fn, task_grads, state, repeats=args.repeats)
    print(
      f"{num_tasks:>4} {num_params:>10} {t_naive:>9.4f} {t_gram:>9.4f} "
      f"{t_naive / t_gram:>7.1f}x {diff / scale:>9.1e}"
    )
    rows.append({"tasks": num_tasks, "params": num_params, "naive_s": t_naive, "gram_s": t_gram})
    del task_grads, d_gram, d_naive
  return rows


if __name__ == "__main__":
  main()
