"""GradNorm's synthetic regression: tasks sharing a basis, output scales far apart."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtgrad._src.compare.problem import Problem


def gradnorm_regression(
  name: str, scales: Sequence[float], size: str, seed: int, steps: int
) -> Problem:
  """GradNorm's synthetic regression (Chen et al., ICML 2018, section 4).

  ``y_t = sigma_t tanh((B + eps_t) x)`` with ``B`` shared (entries
  ``N(0, 10)``) and ``eps_t`` task-specific (``N(0, 3.5)``): tasks share a
  basis but have output scales ``sigma_t`` far apart, so an unbalanced sum is
  dominated by the large-scale task. A ReLU MLP trunk with one linear head
  per task; the reported metric is each task's test mean squared error
  divided by ``sigma_t^2`` (so every task counts equally).
  """
  num_tasks = len(scales)
  tiny = size == "tiny"
  in_dim, out_dim, hidden = (25, 10, 16) if tiny else (250, 100, 100)
  num_train, num_test, batch = (256, 128, 32) if tiny else (2000, 1000, 128)
  rng = np.random.default_rng(seed)
  basis = rng.normal(0.0, np.sqrt(10.0), (out_dim, in_dim))
  eps = rng.normal(0.0, np.sqrt(3.5), (num_tasks, out_dim, in_dim))
  sigmas = np.asarray(scales, np.float64)
  x = rng.normal(size=(num_train + num_test, in_dim))
  y = np.stack(
    [s * np.tanh(x @ (basis + e).T / np.sqrt(in_dim)) for s, e in zip(sigmas, eps, strict=True)]
  )
  x_train = jnp.asarray(x[:num_train], jnp.float32)
  x_test = jnp.asarray(x[num_train:], jnp.float32)
  y_train = jnp.asarray(y[:, :num_train], jnp.float32)  # [T, N, out]
  y_test = jnp.asarray(y[:, num_train:], jnp.float32)
  norm = jnp.asarray(sigmas**2, jnp.float32)

  def init(key):
    sizes = [in_dim, hidden, hidden, hidden]
    keys = jax.random.split(key, len(sizes))
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
    idx = jax.random.choice(key, num_train, (batch,), replace=False)
    pred = predict(params, x_train[idx])
    return jnp.mean((pred - y_train[:, idx]) ** 2, axis=(1, 2))

  def evaluate(params):
    return jnp.mean((predict(params, x_test) - y_test) ** 2, axis=(1, 2)) / norm

  scale_text = ", ".join(f"{s:.3g}" for s in scales)
  return Problem(
    name=name,
    description=f"GradNorm synthetic regression, {num_tasks} tasks, output scales {scale_text}",
    task_names=tuple(f"task{t}" for t in range(num_tasks)),
    metric="test MSE / sigma_t^2",
    higher_is_better=(False,) * num_tasks,
    init=init,
    train_losses=train_losses,
    evaluate=evaluate,
    learning_rate=1e-3,
    steps={"tiny": 20, "default": steps, "paper": 4 * steps}[size],
  )


def regression2(size: str, seed: int) -> Problem:
  """Two tasks, scales 1 and 100."""
  return gradnorm_regression("regression2", (1.0, 100.0), size, seed, steps=300)


def regression10(size: str, seed: int) -> Problem:
  """Ten tasks, scales geometrically spaced from 1 to 100."""
  scales = tuple(float(s) for s in np.geomspace(1.0, 100.0, 10))
  return gradnorm_regression("regression10", scales, size, seed, steps=300)
