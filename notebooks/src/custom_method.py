"""Source of notebooks/custom_method.ipynb (build it with python notebooks/_build.py)."""
# ruff: noqa: E402  (the harness import needs the repository on sys.path first)

# %% [markdown]
# # Writing your own balancing method
#
# Almost every balancing method outputs a weighted sum of the task gradients,
# $d = \sum_t w_t g_t$, with weights computed from small arrays: the $T \times T$ Gram matrix
# $G_{st} = \langle g_s, g_t \rangle$, the losses, a small state. So a method in mtgrad is a
# *weighting*, a pure function on those small arrays,
#
# ```python
# weighting(gram, losses, state, key, *, num_tasks) -> (weights [T], state)
# ```
#
# and `mtgrad.from_weighting` turns it into an `optax` transformation: one pass over the task
# gradients for what the weighting `needs` (the Gram matrix `"gram"`, its diagonal `"sq_norms"`,
# or `"nothing"`), the weighting, and one pass to combine. This notebook writes two methods that
# way, trains with them, and checks their mathematical properties with the test suite's property
# harness.
#
# `MTGRAD_NOTEBOOK_SMALL=1` (set by the test suite) shortens the training runs.

# %%
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mtgrad
from mtgrad._src import registry

SMALL = os.environ.get("MTGRAD_NOTEBOOK_SMALL") == "1"
STEPS = 60 if SMALL else 300

# %% [markdown]
# ## A two-task problem with scales far apart
#
# A shared `tanh` layer and two linear heads regress two targets: $\sin(2 x_0)$ (scale 1) and
# $100 \tanh(x_1 x_2)$ (scale 100). Plots report each loss divided by its target's variance, so
# both start near 1.

# %%
key_x, key_params = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (256, 8))
targets = jnp.stack([jnp.sin(2 * x[:, 0]), 100 * jnp.tanh(x[:, 1] * x[:, 2])])  # [T, batch]
target_variance = jnp.var(targets, axis=1)  # [T]


def init_params():
  k1, k2 = jax.random.split(key_params)
  return {
    "trunk": 0.3 * jax.random.normal(k1, (8, 32)),
    "heads": 0.1 * jax.random.normal(k2, (2, 32)),
  }


def task_losses(params):
  h = jnp.tanh(x @ params["trunk"])  # [batch, 32]
  return jnp.mean((params["heads"] @ h.T - targets) ** 2, axis=1)  # [T]


def train(balancer, steps=STEPS):
  """Balancer then Adam; returns the relative losses of every step, [steps, T]."""
  tx = optax.chain(balancer, optax.adam(1e-2))
  params = init_params()

  @jax.jit
  def step(params, state):
    losses, task_grads = mtgrad.value_and_jacobian(task_losses)(params)
    updates, state = tx.update(task_grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, losses / target_variance

  state, history = tx.init(params), []
  for _ in range(steps):
    params, state, relative_losses = step(params, state)
    history.append(relative_losses)
  return np.asarray(history)


# %% [markdown]
# ## Method 1: Su's inverse-norm weighting, re-derived
#
# Su Jianlin (*multi-task learning, part 1*) asks which weights make training invariant to
# rescaling any task's loss, $L_t \to c_t L_t$. Such a rescaling multiplies $g_t$ by $c_t$, so
# dividing each gradient by its norm cancels it:
#
# $$ w_t = \frac{1}{\lVert g_t \rVert}, \qquad d = \sum_t \frac{g_t}{\lVert g_t \rVert}. $$
#
# The weighting only needs the squared norms $\lVert g_t \rVert^2 = G_{tt}$, so it asks for
# `needs="sq_norms"` ($T$ dot products per parameter instead of $T^2$).
# `mtgrad.safe_reciprocal` gives a zero gradient the weight 0 instead of $1/0$.


# %%
def unit_gradient_weights(sq_norms, losses, state, key, *, num_tasks):
  del losses, key, num_tasks  # only the squared norms matter here
  return mtgrad.safe_reciprocal(jnp.sqrt(sq_norms)), state


def my_inverse_norm(*, num_tasks=None):
  return mtgrad.from_weighting(
    unit_gradient_weights, name="my_inverse_norm", needs="sq_norms", num_tasks=num_tasks
  )


# %% [markdown]
# It is an ordinary transformation: it takes a per-task gradient pytree (every leaf has a leading
# task axis) and returns one update with the parameters' structure. It agrees with the library's
# own `mtgrad.inverse_norm`:

# %%
task_grads = {  # task 0's gradient has norm 5, task 1's norm 0.01
  "trunk": jnp.array([[3.0, 4.0], [0.0, 0.006]]),  # [T=2, 2]
  "bias": jnp.array([0.0, 0.008]),  # [T=2]
}
params = {"trunk": jnp.zeros(2), "bias": jnp.zeros(())}
for tx in (my_inverse_norm(num_tasks=2), mtgrad.inverse_norm(num_tasks=2)):
  updates, state = tx.update(task_grads, tx.init(params), params)
  print(updates, "weights:", state.weights)

# %% [markdown]
# Trained on the two-task problem against equal weighting (`mtgrad.sum`), both chained before Adam:

# %%
runs = {"sum": train(mtgrad.sum()), "my_inverse_norm": train(my_inverse_norm())}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for t, ax in enumerate(axes):
  for (name, history), style in zip(runs.items(), ("--", "-"), strict=True):
    ax.plot(history[:, t], style, label=name)
  ax.set(title=f"task {t} (scale {(1, 100)[t]}): loss / variance", xlabel="step", yscale="log")
  ax.legend()
plt.tight_layout()
plt.show()
for name, history in runs.items():
  print(f"{name:16} final loss / variance: {history[-1].round(3)}")

# %% [markdown]
# Under `sum` the scale-100 task owns the shared layer and task 0 stalls. With unit gradients
# both tasks pull with the same strength: task 0's relative loss ends about ten times lower, at
# the price of a higher loss on task 1, which now shares the layer.
#
# ## Checking it with the property harness
#
# The test suite (`tests/harness.py`) runs every registered method on a catalogue of inputs: random
# gradients, rank-deficient ones, zero rows, duplicated rows, opposite pairs, scales from
# $10^{-10}$ to $10^{10}$, nested pytrees. A method *declares* the properties it has:
#
# - **linear**: the update is $\sum_t w_t g_t$ with the state's `weights`;
# - **non-conflicting**: $\langle d, g_t \rangle \ge 0$ for every task;
# - **permutation-equivariant**: reordering the tasks does not change $d$;
# - **homogeneous**: $d(cJ) = c\, d(J)$ for $c > 0$;
# - **loss-scale-invariant**: rescaling any one task's loss leaves $d$ unchanged.
#
# Each declared property must hold on every case, and each undeclared one must fail on at least
# one (so a method can claim neither too much nor too little). The harness lives in the
# repository's `tests/` folder, not in the installed package: we put the repository on the path.
# `harness.check_properties` takes a `MethodInfo` that is not in the registry.

# %%
here = pathlib.Path.cwd()
repo = next(p for p in (here, *here.parents) if (p / "tests" / "harness.py").is_file())
sys.path.insert(0, str(repo))

# %%
from tests import harness

jax.config.update("jax_numpy_rank_promotion", "raise")  # as in the test suite


def check_properties(info: mtgrad.MethodInfo) -> dict[str, dict[str, str]]:
  """The test suite's check: {property: {case: why it fails}}, asserting the declarations."""
  failures = harness.check_properties(info)
  for prop, failed in failures.items():
    declared = prop in info.properties
    print(f"{prop:24} {'declared' if declared else '-':9} fails on {len(failed):2} cases")
    assert declared != bool(failed), f"{info.name}: {prop} is declared wrongly"
  print(f"({len(harness.catalogue())} catalogue cases)")
  return failures


# %% [markdown]
# Unit gradients should be linear, permutation-equivariant and loss-scale-invariant (that is what
# they were derived for). They should *not* be homogeneous: scaling every gradient by $c$ leaves
# the unit gradients, hence $d$, unchanged.

# %%
inverse_norm_info = mtgrad.MethodInfo(
  "my_inverse_norm",
  my_inverse_norm,
  paper="Su, MTL part 1, re-derived in a notebook",
  properties=frozenset(
    {registry.LINEAR, registry.PERMUTATION_EQUIVARIANT, registry.LOSS_SCALE_INVARIANT}
  ),
)
failures = check_properties(inverse_norm_info)

# %% [markdown]
# The declared properties hold on every case. For the undeclared ones the harness found
# counterexamples. Homogeneity, on the first case that breaks it (the harness tries $c = 10^{-3}$
# and $c = 7$): by hand, $d(7J)$ equals $d(J)$ instead of $7\, d(J)$.

# %%
case = next(c for c in harness.catalogue() if c.name in failures["homogeneous"])
d = harness.run(inverse_norm_info, case).updates[0]  # the flattened update of the first step
d7 = harness.run(inverse_norm_info, case, matrix=7 * case.matrix).updates[0]
print(case.name, "->", failures["homogeneous"][case.name])
norm = np.linalg.norm
print(f"|d(J)| = {norm(d):.4f}, |d(7J)| = {norm(d7):.4f}")
print(f"|d(7J) - d(J)| = {norm(d7 - d):.1e}, |d(7J) - 7 d(J)| = {norm(d7 - 7 * d):.2f}")

# %% [markdown]
# Non-conflict fails too: with one task against two that point the other way, the sum of unit
# gradients goes against the lone task ($\langle d, g_0 \rangle < 0$, its loss rises to first
# order). Methods such as `mtgrad.mgda` or `mtgrad.nash_mtl` declare this property.

# %%
print(failures["non_conflicting"]["nested/conflicting_T3"])

# %% [markdown]
# ## Method 2: a loss-only method, softmax of the losses
#
# Give more weight to the tasks that are behind, with a temperature $\tau$:
#
# $$
# w = T \, \operatorname{softmax}(L / \tau), \qquad
# w_t = T\,\frac{e^{L_t/\tau}}{\sum_s e^{L_s/\tau}} .
# $$
#
# The weights depend on the losses alone: `needs="nothing"` skips the Gram pass, and
# `needs_losses=True` makes `update` require `losses=`. The temperature is an ordinary argument of
# the factory, closed over by the weighting.


# %%
def softmax_of_losses(*, temperature=1.0, num_tasks=None):
  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key
    return num_tasks * jax.nn.softmax(losses / temperature), state

  return mtgrad.from_weighting(
    weighting, name="softmax_of_losses", needs="nothing", needs_losses=True, num_tasks=num_tasks
  )


# %% [markdown]
# ### The single-backward path: `mtgrad.weights_from_losses`
#
# When the weights depend on the losses alone, the $T$ per-task gradients are not needed:
# $d = \sum_t w_t g_t$ is the gradient of $\sum_t w_t L_t$ with $w$ held fixed, one backward pass.
# With `jax.vjp` the forward pass is shared too: the pullback of the weights *is* $d$.
#
# Softmax compares raw loss values, so we feed it the relative losses (each divided by its target's
# variance); the harness below shows why.


# %%
def relative_losses(params):
  return task_losses(params) / target_variance


balancer = softmax_of_losses(num_tasks=2)


@jax.jit
def single_backward(params, balancer_state):
  losses, pullback = jax.vjp(relative_losses, params)
  weights, balancer_state = mtgrad.weights_from_losses(balancer, balancer_state, losses)
  (update,) = pullback(weights.astype(losses.dtype))  # = sum_t w_t g_t
  return update, losses, weights, balancer_state


@jax.jit
def stacked(params, balancer_state):
  losses, task_grads = mtgrad.value_and_jacobian(relative_losses)(params)
  return balancer.update(task_grads, balancer_state, params, losses=losses)[0]


params = init_params()
update, losses, weights, _ = single_backward(params, balancer.init(params))
difference = jax.tree.map(
  lambda a, b: jnp.max(jnp.abs(a - b)), update, stacked(params, balancer.init(params))
)
print("losses", losses, "weights", weights)
print("largest difference between the two paths:", max(jax.tree.leaves(difference)))

# %% [markdown]
# A jitted training step on that path: the balancer's state is kept next to Adam's, since no task
# gradients go through a chain.

# %%
adam = optax.adam(1e-2)


@jax.jit
def step(params, balancer_state, adam_state):
  update, losses, weights, balancer_state = single_backward(params, balancer_state)
  updates, adam_state = adam.update(update, adam_state, params)
  return optax.apply_updates(params, updates), balancer_state, adam_state, losses, weights


params = init_params()
balancer_state, adam_state = balancer.init(params), adam.init(params)
history = []
for _ in range(STEPS):
  params, balancer_state, adam_state, losses, weights = step(params, balancer_state, adam_state)
  history.append((losses, weights))
losses_history, weights_history = (np.asarray(h) for h in zip(*history, strict=True))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for t in range(2):
  axes[0].plot(losses_history[:, t], label=f"task {t}")
  axes[1].plot(weights_history[:, t], label=f"task {t}")
axes[0].set(title="loss / variance", xlabel="step", yscale="log")
axes[1].set(title="softmax-of-losses weights $w_t$", xlabel="step")
for ax in axes:
  ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The weights follow the losses: task 0 starts behind and gets the larger weight; once its loss
# falls below task 1's, the weights cross and task 1 gets more. They always sum to $T = 2$.
#
# ### Its properties
#
# Linear and permutation-equivariant by construction; homogeneous, since the weights ignore the
# gradients. Not loss-scale-invariant: the harness should find counterexamples.

# %%
softmax_info = mtgrad.MethodInfo(
  "softmax_of_losses",
  softmax_of_losses,
  paper="a notebook",
  needs_losses=True,
  properties=frozenset({registry.LINEAR, registry.PERMUTATION_EQUIVARIANT, registry.HOMOGENEOUS}),
)
failures = check_properties(softmax_info)

# %% [markdown]
# The counterexample is easy to see by hand: multiply task 0's loss by 1000 and it takes all the
# weight, where a loss-scale-invariant method would not move at all.

# %%
state = balancer.init(params)
for losses in (jnp.array([0.5, 2.0]), jnp.array([500.0, 2.0])):
  print("losses", losses, "-> weights", mtgrad.weights_from_losses(balancer, state, losses)[0])

# %% [markdown]
# ## From a notebook to the library
#
# A method in the library is the same weighting in its own file under `mtgrad/_src/methods/`, with
# the maths, a doctest and references in its docstring, plus one `MethodInfo` entry in
# `mtgrad/_src/registry.py`. The test suite then runs this same property check on it, along with
# optax's contract checks (training inside `lax.scan`, `jit`, `vmap`, `inject_hyperparams`,
# `flax.nnx.Optimizer`). See "Writing a method" in the README.
