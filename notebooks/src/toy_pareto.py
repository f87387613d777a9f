"""Source of notebooks/toy_pareto.ipynb (build it with python notebooks/_build.py)."""

# %% [markdown]
# # The two-objective toy of CAGrad and Nash-MTL
#
# Two losses of a two-dimensional parameter $x = (x_1, x_2)$, built to be hard for gradient
# methods: a flat plateau for $x_2 > 0$ where the two gradients are small and conflicting, and a
# valley below whose floor, $x_2 \approx -8.36$ with $-7 \le x_1 \le 7$, is the **Pareto set**:
# along it, moving right lowers $f_1$ and raises $f_2$. Liu et al. introduced it to illustrate
# CAGrad (NeurIPS 2021); Navon et al. reused it for Nash-MTL (ICML 2022) with the first loss
# multiplied by 0.1, so that the two losses live on different scales. `mtgrad` ships the
# functions in `mtgrad._src.compare.toy` (the problem behind `mtgrad compare --problem toy`).
#
# **What the papers report.** CAGrad's introduction argues that earlier gradient-manipulation
# methods at best converge to *some* point of the Pareto set, which one depending on where they
# start, and may over-optimise one objective; CAGrad instead converges to the minimum of the
# average loss, which lies on the Pareto set. Its toy (`toy.py` in the authors' repository)
# trains Adam on the average loss, MGDA, PCGrad and CAGrad ($c = 0.5$) for 100,000 Adam steps
# (learning rate $10^{-3}$) from three starting points. Nash-MTL's Figure 1 shows trajectories in
# *loss space* from five starting points, 35,000 Adam steps, with the 0.1 scale; its caption
# notes that for linear scalarisation (LS), PCGrad and CAGrad the optimisation is controlled by
# the gradient of $\ell_2$, the one with the larger magnitude. Nash-MTL's weights are the Nash
# bargaining solution, which does not change when a loss is rescaled.
#
# Below, mtgrad's implementations run from the same starting points for the same number of
# steps, each chained before `optax.adam(1e-3)`: part 1 is CAGrad's setting, part 2 Nash-MTL's,
# part 3 runs every method of the library on Nash-MTL's setting. The runs are deterministic, and
# the text describes what they produce; the central claims are `assert`ed.
#
# `MTGRAD_NOTEBOOK_SMALL=1` (set by the test suite) only shortens part 3 to a few methods: parts 1
# and 2 are the papers' runs in full (a few seconds each, the whole run is one compiled program).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mtgrad
from mtgrad._src import registry
from mtgrad._src.compare import toy

SMALL = os.environ.get("MTGRAD_NOTEBOOK_SMALL") == "1"
RECORD_EVERY = 100  # steps between two recorded points of a trajectory

# %% [markdown]
# ## The functions
#
# With $c_+ = \max(\tanh(x_2/2), 0)$ and $c_- = \max(\tanh(-x_2/2), 0)$ (one of the two is zero),
#
# $$
# \begin{aligned}
# f_1 &= c_+ \big[\log \max(|\tfrac12(-x_1 - 7) - \tanh(-x_2)|, 5\cdot10^{-6}) + 6\big]
#      + c_- \big[((x_1 - 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\big], \\
# f_2 &= c_+ \big[\log \max(|\tfrac12(-x_1 + 3) + \tanh(-x_2) + 2|, 5\cdot10^{-6}) + 6\big]
#      + c_- \big[((x_1 + 7)^2 + 0.1 (x_2 + 8)^2)/10 - 20\big].
# \end{aligned}
# $$
#
# `toy.losses` returns Nash-MTL's version, $\ell_1 = 0.1 f_1 + 2.1$ and $\ell_2 = f_2 + 21$: the
# offsets make both losses positive (loss-driven methods such as FAMO need that) and change
# neither the gradients' directions nor the Pareto set. CAGrad's $f_1, f_2$ are recovered from
# them. The average of $f_1$ and $f_2$ is smallest at $x^\star = (0, -8.36)$, the star in the
# plots.


# %%
def nash_losses(x):
  """Nash-MTL's losses (l1 scaled by 0.1, both offset to be positive): [2]."""
  return jnp.stack(toy.losses(x[0], x[1]))


def cagrad_losses(x):
  """CAGrad's losses f1, f2 (no scale, no offset): [2]."""
  l1, l2 = toy.losses(x[0], x[1])
  return jnp.stack([(l1 - toy.OFFSETS[0]) / toy.SCALE, l2 - toy.OFFSETS[1]])


def to_cagrad(nash):
  """Nash-MTL's losses [..., 2] -> CAGrad's f1, f2 (the same points)."""
  return (nash - np.asarray(toy.OFFSETS)) / np.array([toy.SCALE, 1.0])


FRONT = toy.pareto_front()  # [K, 2] in Nash-MTL's losses, sorted by l1
OPTIMUM = np.array([0.0, -8.3552])  # minimum of (f1 + f2) / 2

axis = np.linspace(-10, 10, 201)
grid_x1, grid_x2 = np.meshgrid(axis, axis)
grid_losses = to_cagrad(toy.landscape(np.stack([grid_x1.ravel(), grid_x2.ravel()], 1)))
grid_losses = grid_losses.reshape(*grid_x1.shape, 2)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
titles = ("$f_1$", "$f_2$", "$(f_1 + f_2) / 2$")
panels = (grid_losses[..., 0], grid_losses[..., 1], grid_losses.mean(-1))
for ax, values, title in zip(axes, panels, titles, strict=True):
  ax.contour(grid_x1, grid_x2, values, levels=15, cmap="viridis", linewidths=0.8)
  ax.plot([-7, 7], [OPTIMUM[1]] * 2, color="0.5", lw=4, alpha=0.6, label="Pareto set")
  ax.set(title=title, xlabel="$x_1$", aspect="equal")
axes[2].plot(*OPTIMUM, "k*", ms=12, label="$x^\\star$")
axes[0].set_ylabel("$x_2$")
axes[2].legend(loc="upper right", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One jitted program per method
#
# The whole run is one `jax.lax.scan` over the steps, `jax.vmap`-ed over the starting points and
# compiled once. A step takes the two losses and their gradients (`mtgrad.value_and_jacobian`, the
# per-task gradients of the parameters, here a `[2, 2]` Jacobian), hands both to the chain
# `balancer -> adam`, and applies the update. Every `RECORD_EVERY` steps the position is recorded.


# %%
def trajectories(balancer, losses_fn, starts, steps):
  """Positions [S, steps // RECORD_EVERY + 1, 2] from each start, ending at the final one."""
  tx = optax.chain(balancer, optax.adam(1e-3))

  def one_start(x):
    def step(carry, _):
      x, state = carry
      losses, task_grads = mtgrad.value_and_jacobian(losses_fn)(x)
      updates, state = tx.update(task_grads, state, x, losses=losses)
      return (optax.apply_updates(x, updates), state), None

    def record(carry, _):
      recorded = carry[0]
      return jax.lax.scan(step, carry, length=RECORD_EVERY)[0], recorded

    (x, _), path = jax.lax.scan(record, (x, tx.init(x)), length=steps // RECORD_EVERY)
    return jnp.concatenate([path, x[None]])

  return np.asarray(jax.jit(jax.vmap(one_start))(jnp.asarray(starts, jnp.float32)), np.float64)


def on_front(points):
  """Whether each position [..., 2] lies on the Pareto set (its losses on the front)."""
  losses = toy.landscape(points.reshape(-1, 2))
  return (toy.distance_to_front(losses, FRONT) < 0.05).reshape(points.shape[:-1])


# %% [markdown]
# Two plots per run: the trajectories on the contours of the average loss, with the Pareto set in
# grey (the papers' parameter-space view), and the same trajectories in loss space with the Pareto
# front (Nash-MTL's view). Black dots are the starts, coloured stars the end points; in part 1 the
# white star is $x^\star$.


# %%
def plot_runs(runs, losses_of, contours, limits, labels, title, optimum=False):
  """Parameter space (top row) and loss space (bottom row), one column per method."""
  fig, axes = plt.subplots(2, len(runs), figsize=(3.1 * len(runs), 6.4), squeeze=False)
  front = losses_of(FRONT)
  for column, (name, paths) in enumerate(runs.items()):
    top, bottom = axes[0, column], axes[1, column]
    top.contour(grid_x1, grid_x2, contours, levels=12, cmap="viridis", linewidths=0.5)
    top.plot([-7, 7], [OPTIMUM[1]] * 2, color="0.5", lw=4, alpha=0.6)
    if optimum:
      top.plot(*OPTIMUM, "*", color="w", ms=16, mec="k", mew=1.0)
    bottom.plot(*front.T, color="0.5", lw=4, alpha=0.6)
    for s, path in enumerate(paths):
      losses = losses_of(toy.landscape(path))
      for ax, curve in ((top, path), (bottom, losses)):
        ax.plot(*curve.T, color=f"C{s}", lw=1.2)
        ax.plot(*curve[0], "ko", ms=4)
        ax.plot(*curve[-1], "*", color=f"C{s}", ms=10, mec="k", mew=0.5)
    top.set(title=name, xlim=(-10, 10), ylim=(-10, 10), aspect="equal", xlabel="$x_1$")
    bottom.set(xlim=limits[0], ylim=limits[1], xlabel=labels[0])
  axes[0, 0].set_ylabel("$x_2$")
  axes[1, 0].set_ylabel(labels[1])
  fig.suptitle(title)
  plt.tight_layout()
  plt.show()


def summary(runs):
  """One line per method and start: the end point, on the Pareto set or not."""
  for name, paths in runs.items():
    ends = paths[:, -1]
    marks = np.where(on_front(ends), "*", " ")
    cells = [f"({a:5.2f}, {b:5.2f}){mark}" for (a, b), mark in zip(ends, marks, strict=True)]
    print(f"{name:12}" + "  ".join(cells))
  print("(x1, x2) at the end; * = on the Pareto set")


# %% [markdown]
# ## Part 1: CAGrad's setting
#
# The losses $f_1, f_2$ as they are, three starts, 100,000 steps. `mtgrad.mean` is Adam on the
# average loss; `mtgrad.cagrad(c=0.5)` is the paper's default (the toy script divides the update by
# $1 + c$, which Adam's normalisation makes immaterial).

# %%
CAGRAD_STARTS = [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)]
cagrad_methods = {
  "mean (Adam)": mtgrad.mean(),
  "mgda": mtgrad.mgda(),
  "pcgrad": mtgrad.pcgrad(key=jax.random.key(0)),
  "cagrad": mtgrad.cagrad(c=0.5),
}
part1 = {
  name: trajectories(balancer, cagrad_losses, CAGRAD_STARTS, 100_000)
  for name, balancer in cagrad_methods.items()
}
plot_runs(
  part1,
  to_cagrad,
  grid_losses.mean(-1),
  ((-21, 9), (-21, 9)),
  ("$f_1$", "$f_2$"),
  "CAGrad's setting (white star: $x^\\star$)",
  optimum=True,
)
summary(part1)

# %% [markdown]
# What the runs show, next to what the paper says:
#
# - **Adam on the average loss** gets stuck on the plateau from the two upper starts, where the
#   two gradients nearly cancel; from $(-8.5, -5)$ it slides down to $x^\star$.
# - **MGDA** and **PCGrad** reach the Pareto set from every start, but at different points of it
#   depending on the start, and not at $x^\star$: MGDA stops as soon as no direction improves both
#   losses, wherever that happens.
# - **CAGrad** reaches $x^\star$, the minimum of the average loss, from all three starts. As the
#   paper claims: it keeps the average-loss direction (so it does not stop at an arbitrary Pareto
#   point) while the conflict-averse correction carries it across the plateau where the average
#   gradient alone stalls.

# %%
ends = {name: paths[:, -1] for name, paths in part1.items()}
at_optimum = {name: np.linalg.norm(e - OPTIMUM, axis=1) < 0.1 for name, e in ends.items()}
assert on_front(ends["mean (Adam)"]).tolist() == [False, True, False]
assert at_optimum["mean (Adam)"].tolist() == [False, True, False]
assert at_optimum["cagrad"].all()
for name in ("mgda", "pcgrad"):
  assert on_front(ends[name]).all() and not at_optimum[name].any(), name
  assert np.ptp(ends[name][:, 0]) > 2.0, name  # end points spread along the set

# %% [markdown]
# ## Part 2: Nash-MTL's setting
#
# The first loss scaled by 0.1 ($\ell_1$), five starts, 35,000 steps. `mtgrad.sum` is linear
# scalarisation (LS), `mtgrad.nash_mtl()` the paper's method with its defaults.

# %%
NASH_STARTS = list(toy.STARTS)
nash_methods = {
  "LS (sum)": mtgrad.sum(),
  "pcgrad": mtgrad.pcgrad(key=jax.random.key(0)),
  "cagrad": mtgrad.cagrad(c=0.5),
  "mgda": mtgrad.mgda(),
  "nash_mtl": mtgrad.nash_mtl(num_tasks=2),
}
part2 = {
  name: trajectories(balancer, nash_losses, NASH_STARTS, 35_000)
  for name, balancer in nash_methods.items()
}
nash_contours = toy.landscape(np.stack([grid_x1.ravel(), grid_x2.ravel()], 1)).sum(1)
plot_runs(
  part2,
  lambda losses: losses,
  nash_contours.reshape(grid_x1.shape),
  ((0, 3), (0, 30)),
  (r"$\ell_1$", r"$\ell_2$"),
  "Nash-MTL's setting",
)
summary(part2)

# %% [markdown]
# Next to Nash-MTL's Figure 1:
#
# - **LS, PCGrad and CAGrad**: as the caption says, $\ell_2$'s larger gradient drives them. LS and
#   CAGrad end at the same point from four starts, $x_1 \approx -5.7$, far on $\ell_2$'s side of the
#   front ($\ell_1 \approx 1.7$ and $\ell_2 \approx 1.2$, where $\ell_1$ ranges from 0.1 to 2.1
#   along the front). PCGrad ends on $\ell_2$'s half of the front from the three starts on the left,
#   at $x_1 \approx 5$ from $(9, -1)$. From $(9, 9)$ none of the three leaves the plateau in 35,000
#   steps.
# - **MGDA** reaches the front from all five starts, but three of them end at $x_1 \approx 6$ to 7,
#   the end of the front where $\ell_1$ is minimal. The 0.1 scale makes $\ell_1$'s gradient the
#   short one, and the min-norm point of the convex hull leans towards the shortest gradient.
# - **Nash-MTL** reaches the front from all five starts, at end points spread over its middle,
#   from $x_1 \approx -3.4$ to $5$: no single task drives it, since its weights do not depend on
#   the losses' scales.

# %%
ends = {name: paths[:, -1] for name, paths in part2.items()}
assert on_front(ends["nash_mtl"]).all() and np.ptp(ends["nash_mtl"][:, 0]) > 6.0
assert on_front(ends["mgda"]).all() and np.sum(ends["mgda"][:, 0] > 5.5) >= 3
for name in ("LS (sum)", "pcgrad", "cagrad"):
  assert on_front(ends[name]).tolist() == [True, True, False, True, True], name
  assert np.all(ends[name][[0, 1, 3], 0] < -3.0), name  # l2's side of the front
for name in ("LS (sum)", "cagrad"):
  assert np.allclose(ends[name][[0, 1, 3, 4], 0], -5.7, atol=0.1), name

# %% [markdown]
# ## Part 3: every method of mtgrad on Nash-MTL's setting
#
# Every registered method, built with its registry defaults
# (`registry.info(name).make(num_tasks=2)`, as `mtgrad compare` builds them), on the same five
# starts and 35,000 steps. Loss space only; the grey curve is the front, the stars the end points.

# %%
names = mtgrad.names()
if SMALL:  # CI: a few methods only; each costs a compilation
  names = ("imtl_g", "gradnorm", "uncertainty")
part3 = {
  name: trajectories(registry.info(name).make(2, key=0), nash_losses, NASH_STARTS, 35_000)
  for name in names
}
columns = 6
rows = -(-len(part3) // columns)
fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.1 * rows), squeeze=False)
for ax in axes.ravel()[len(part3) :]:
  ax.remove()
for ax, (name, paths) in zip(axes.ravel(), part3.items(), strict=False):
  ax.plot(*FRONT.T, color="0.5", lw=3, alpha=0.6)
  for s, path in enumerate(paths):
    losses = toy.landscape(path)
    ax.plot(*losses.T, color=f"C{s}", lw=0.9)
    ax.plot(*losses[-1], "*", color=f"C{s}", ms=7, mec="k", mew=0.4)
  ax.set(xlim=(0, 3), ylim=(0, 30))
  ax.set_xlabel(r"$\ell_1$", fontsize=8, labelpad=1)
  ax.set_ylabel(r"$\ell_2$", fontsize=8, labelpad=1)
  ax.set_title(name, fontsize=9)
  ax.tick_params(labelsize=7)
plt.tight_layout()
plt.show()

print(f"{'method':14} {'starts on the front':>19}   end points l1 (of the starts on it)")
for name, paths in part3.items():
  ends = paths[:, -1]
  reached = on_front(ends)
  l1 = np.sort(toy.landscape(ends[reached])[:, 0])
  print(f"{name:14} {int(reached.sum()):>19}   {np.round(l1, 2)}")

# %% [markdown]
# What the full-size run shows (in CI only a few of these methods run):
#
# - **Scale-invariant gradient weightings**, those that divide out each gradient's norm one way or
#   another (`inverse_norm`, `imtl_g`, `imtl`, `fairgrad`, `nash_mtl`), behave like Nash-MTL: the
#   front from all five starts, end points spread along it.
# - **GradNorm** also reaches the front from all five starts, but ends near its middle,
#   $|x_1| < 2$: its target gradient norms grow with $r_t^\alpha$, the task's loss ratio
#   $L_t / L_t(0)$ relative to the other's, which favours whichever task has improved less.
# - **Weightings that divide by the losses** (`inverse_loss`, `initial_loss`, `gls`,
#   `uncertainty`, `imtl_l`, `stch`, `famo`) stay on the plateau from $(-8.5, 7.5)$ and $(9, 9)$,
#   the two starts from which Adam on CAGrad's unscaled average stalls in part 1: on the plateau
#   $\ell_2$ is about ten times $\ell_1$, so dividing by the losses roughly undoes the 0.1 scale.
#   FAMO's own paper runs this toy with settings of its own (50,000 steps, its $\gamma$, the losses
#   recomputed after each step); the registry's default is the one-step-lag variant with 35,000
#   steps here, so this panel is not a reproduction of FAMO's figure.
# - `upgrad`, `dualproj`, `aligned_mtl`, `gradvac`, `graddrop`, `dwa` and `metabalance` end like
#   LS: on $\ell_2$'s side of the front from four starts, on the plateau from $(9, 9)$.
# - `min_norm` and `gcs` treat task 0 ($\ell_1$) as the primary task by default and end at or near
#   $\ell_1$'s minimum from most starts, like MGDA.

# %%
scale_invariant = [
  n for n in ("inverse_norm", "imtl_g", "imtl", "fairgrad", "nash_mtl") if n in part3
]
for name in scale_invariant:
  ends = part3[name][:, -1]
  assert on_front(ends).all() and np.ptp(ends[:, 0]) > 6.0, name
ends = part3["gradnorm"][:, -1]
assert on_front(ends).all() and np.all(np.abs(ends[:, 0]) < 2.0)
divide_by_losses = ("inverse_loss", "initial_loss", "gls", "uncertainty", "imtl_l", "stch", "famo")
for name in [n for n in divide_by_losses if n in part3]:
  assert on_front(part3[name][:, -1]).tolist() == [False, True, False, True, True], name
