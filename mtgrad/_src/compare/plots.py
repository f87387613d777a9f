"""The figures of ``mtgrad compare`` (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from mtgrad._src.compare.problem import Problem
from mtgrad._src.compare.toy import nondominated

MISSING = (
  'mtgrad compare: the plots need matplotlib: pip install "mtgrad[compare]" (or --no-plots).'
)
COLUMNS = 8
DPI = 72


def require_matplotlib() -> None:
  """Raises a clear ImportError when matplotlib is missing."""
  try:
    import matplotlib  # noqa: F401
  except ImportError as e:
    raise ImportError(MISSING) from e


def _figure(width: float, height: float) -> Any:
  require_matplotlib()
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _grid(
  count: int, *, sharex: bool = True, sharey: bool = False, panel=(1.75, 1.55)
) -> tuple[Any, list]:
  """A figure of ``count`` small panels, ``COLUMNS`` per row. Fixed margins
  instead of ``tight_layout``: the layout of 30 panels would take seconds."""
  cols = min(count, COLUMNS)
  rows = math.ceil(count / cols)
  fig = _figure(panel[0] * cols, panel[1] * rows + 0.5)
  grid = fig.subplots(rows, cols, sharex=sharex, sharey=sharey, squeeze=False).ravel()
  for ax in grid[count:]:
    ax.remove()
  axes = list(grid[:count])
  for ax in axes:
    ax.tick_params(labelsize=6, length=2, pad=1)
  top = 1.0 - 0.5 / (panel[1] * rows + 0.5)
  fig.subplots_adjust(left=0.03, right=0.99, bottom=0.04, top=top, wspace=0.3, hspace=0.45)
  return fig, axes


def _save(fig: Any, path: pathlib.Path, title: str | None, dpi: int = DPI) -> pathlib.Path:
  if title:
    fig.suptitle(title, fontsize=9, y=0.995, va="top")
  fig.savefig(path, dpi=dpi)
  return path


def _ok(rows: list[dict]) -> list[dict]:
  return [r for r in rows if not r["error"]]


def toy_trajectories(
  problem: Problem, rows: list[dict], path: pathlib.Path, dpi: int = DPI
) -> pathlib.Path:
  """Each method's trajectories from every start on the contours of the
  summed losses, with the Pareto set (grey) in parameter space."""
  rows = _ok(rows)
  lo, hi = problem.box
  axis = np.linspace(lo, hi, 160)
  x1, x2 = np.meshgrid(axis, axis)
  points = np.stack([x1.ravel(), x2.ravel()], axis=1)
  values = problem.landscape(points)
  total = values.sum(1).reshape(x1.shape)
  fine = np.linspace(lo, hi, 400)
  grid = np.stack([g.ravel() for g in np.meshgrid(fine, fine)], axis=1)
  pareto_set = grid[nondominated(problem.landscape(grid))]
  fig, axes = _grid(len(rows), sharey=True)
  colors = [f"C{i}" for i in range(10)]
  for ax, r in zip(axes, rows, strict=True):
    ax.contour(x1, x2, total, levels=10, linewidths=0.4, cmap="viridis")
    ax.plot(pareto_set[:, 0], pareto_set[:, 1], ".", color="0.55", ms=1.5)
    for s, traj in enumerate(np.asarray(r["trajectories"])):
      color = colors[s % len(colors)]
      ax.plot(traj[:, 0], traj[:, 1], "-", color=color, lw=1.0)
      ax.plot(traj[0, 0], traj[0, 1], "o", color="k", ms=2.5)
      ax.plot(traj[-1, 0], traj[-1, 1], "*", color=color, ms=4)
    ax.set_title(r["method"], fontsize=7, pad=2)
  axes[0].set_xlim(lo, hi)
  axes[0].set_ylim(lo, hi)
  title = "Toy: trajectories from 5 starts on the contours of l1 + l2 (grey: Pareto set)"
  return _save(fig, path, title, dpi)


def toy_loss_space(problem: Problem, rows: list[dict], path: pathlib.Path) -> pathlib.Path:
  """Each method's trajectories in loss space with the Pareto front."""
  rows = _ok(rows)
  front = problem.pareto_front
  fig, axes = _grid(len(rows), sharey=True)
  colors = [f"C{i}" for i in range(10)]
  for ax, r in zip(axes, rows, strict=True):
    ax.plot(front[:, 0], front[:, 1], "-", color="0.6", lw=3)
    for s, traj in enumerate(np.asarray(r["trajectories"])):
      loss = problem.landscape(traj)
      ax.plot(loss[:, 0], loss[:, 1], "-", color=colors[s % len(colors)], lw=1.0)
      ax.plot(loss[0, 0], loss[0, 1], "o", color="k", ms=2.5)
    ax.set_title(r["method"], fontsize=7, pad=2)
  axes[0].set_xlim(0.0, 3.0)
  axes[0].set_ylim(0.0, 30.0)
  return _save(fig, path, "Toy: trajectories in loss space (l1, l2); grey: the Pareto front")


def weights(problem: Problem, rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
  """Each method's task weights over training (the state's ``weights``)."""
  rows = [r for r in _ok(rows) if r["curves"]["weights"] is not None]
  if not rows:
    return None
  fig, axes = _grid(len(rows))
  for ax, r in zip(axes, rows, strict=True):
    w = np.asarray(r["curves"]["weights"])
    for t in range(w.shape[1]):
      ax.plot(r["curves"]["step"], w[:, t], lw=0.9, label=problem.task_names[t])
    ax.set_title(r["method"], fontsize=7, pad=2)
  if problem.num_tasks <= 4:
    axes[0].legend(fontsize=5, frameon=False)
  starts = " (mean over the starts)" if problem.starts is not None else ""
  return _save(fig, path, f"{problem.name}: task weights over training{starts}")


def curves(problem: Problem, rows: list[dict], path: pathlib.Path) -> pathlib.Path:
  """Each method's per-task training loss, relative to its first value."""
  from matplotlib.ticker import NullFormatter

  rows = _ok(rows)
  fig, axes = _grid(len(rows))
  for ax, r in zip(axes, rows, strict=True):
    loss = np.asarray(r["curves"]["train_losses"])
    relative = loss / np.where(loss[:1] == 0, 1.0, loss[:1])
    for t in range(loss.shape[1]):
      ax.plot(r["curves"]["step"], relative[:, t], lw=0.9, label=problem.task_names[t])
    if np.all(relative > 0):
      ax.set_yscale("log")
      ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(r["method"], fontsize=7, pad=2)
  if problem.num_tasks <= 4:
    axes[0].legend(fontsize=5, frameon=False)
  return _save(fig, path, f"{problem.name}: training loss per task / its first value")


def delta_m_bars(problem: Problem, rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
  """Delta_m% against equal weighting, one bar per method, best first."""
  scored = sorted((r for r in _ok(rows) if "delta_m_sum" in r), key=lambda r: r["delta_m_sum"])
  if not scored:
    return None
  fig = _figure(4.2, 0.5 + 0.16 * len(scored))
  ax = fig.add_subplot(1, 1, 1)
  values = [r["delta_m_sum"] for r in scored]
  ax.barh(range(len(scored)), values, color=["C2" if v < 0 else "C3" for v in values])
  ax.set_yticks(range(len(scored)), [r["method"] for r in scored], fontsize=6)
  ax.invert_yaxis()
  ax.axvline(0.0, color="k", lw=0.6)
  ax.tick_params(axis="x", labelsize=6)
  ax.set_xlabel("Δm% vs sum (lower is better)", fontsize=7)
  ax.set_title(f"{problem.name}: {problem.metric}", fontsize=8)
  fig.tight_layout(pad=0.4)
  return _save(fig, path, None)


def write_all(problem: Problem, rows: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """Every figure of one problem into ``out``; returns the files written."""
  if not _ok(rows):
    return []
  out.mkdir(parents=True, exist_ok=True)
  written = [
    delta_m_bars(problem, rows, out / f"{problem.name}_delta_m.png"),
    curves(problem, rows, out / f"{problem.name}_curves.png"),
    weights(problem, rows, out / f"{problem.name}_weights.png"),
  ]
  if problem.landscape is not None and _ok(rows):
    written.append(toy_trajectories(problem, rows, out / f"{problem.name}_trajectories.png"))
    written.append(toy_loss_space(problem, rows, out / f"{problem.name}_loss_space.png"))
  return [p for p in written if p is not None]
