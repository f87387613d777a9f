"""Delta_m% and the printed tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtgrad._src.compare.problem import Problem

MAX_TASK_COLUMNS = 4
FRONT_TOLERANCE = 0.05  # a start "reaches" the toy's Pareto front within this loss-space distance

DELTA_M_CAPTION = (
  "Δm% = (100/T) Σ_t (-1)^h_t (M_t - B_t) / B_t against baseline B, h_t = 1 if higher "
  "is better: lower is better."
)


def delta_m(
  metrics: Sequence[float], baseline: Sequence[float], higher_is_better: Sequence[bool]
) -> float:
  r"""The multi-task score Delta_m% (Maninis et al., CVPR 2019).

  .. math::

     \Delta_m = \frac{100}{T} \sum_t (-1)^{h_t} \frac{M_t - B_t}{B_t}

  with ``h_t = 1`` when a higher metric is better for task ``t``: lower is
  better, and a negative value beats the baseline ``B``.
  """
  m, b = np.asarray(metrics, np.float64), np.asarray(baseline, np.float64)
  sign = np.where(np.asarray(higher_is_better), -1.0, 1.0)
  return float(100.0 * np.mean(sign * (m - b) / b))


def add_scores(problem: Problem, rows: list[dict], stl: dict | None) -> None:
  """Adds ``delta_m_sum`` (and ``delta_m_stl``) to every successful row."""
  base = next((r for r in rows if r["method"] == "sum" and not r["error"]), None)
  for r in [*rows, *([stl] if stl else [])]:
    if r["error"]:
      continue
    if base is not None:
      r["delta_m_sum"] = delta_m(r["metrics"], base["metrics"], problem.higher_is_better)
    if stl is not None and not stl["error"]:
      r["delta_m_stl"] = delta_m(r["metrics"], stl["metrics"], problem.higher_is_better)


def _cell(value: float) -> str:
  return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"


def _score(value: float) -> str:
  rounded = round(value, 1)
  return f"{rounded if rounded != 0 else 0.0:+.1f}"  # no "-0.0"


def _ms(value: float) -> str:
  return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def format_table(problem: Problem, rows: list[dict], stl: dict | None = None) -> str:
  """The table of one problem: per-task metrics, Delta_m%, step time."""
  num_tasks = problem.num_tasks
  shown = min(num_tasks, MAX_TASK_COLUMNS)
  header = ["method", *problem.task_names[:shown]]
  if num_tasks > shown:
    header += ["...", "mean"]
  front = problem.pareto_front is not None
  if front:
    header += ["front dist", "on front"]
  header.append("Δm% vs sum")
  if stl is not None:
    header.append("Δm% vs STL")
  header.append("step ms")
  lines = []
  for r in ([stl] if stl else []) + rows:
    if r["error"]:
      lines.append([r["method"], f"error: {r['error']}"])
      continue
    metrics = r["metrics"]
    cells = [r["method"], *(_cell(v) for v in metrics[:shown])]
    if num_tasks > shown:
      cells += ["", _cell(float(np.mean(metrics)))]
    if front:
      dist = np.asarray(r.get("front_distance", [np.nan]))
      cells += [f"{np.mean(dist):.3f}", f"{int(np.sum(dist < FRONT_TOLERANCE))}/{dist.size}"]
    cells.append(_score(r["delta_m_sum"]) if "delta_m_sum" in r else "")
    if stl is not None:
      cells.append(_score(r["delta_m_stl"]) if "delta_m_stl" in r else "")
    cells.append(_ms(r["step_ms"]))
    if not r["finite"]:
      cells[0] += " (non-finite)"
    lines.append(cells)
  full = [c for c in lines if len(c) == len(header)]
  widths = [max(len(h), *(len(c[i]) for c in full)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()
  direction = "higher is better" if all(problem.higher_is_better) else "lower is better"
  caption = [problem.description, f"Metric: {problem.metric}, {direction}. {DELTA_M_CAPTION}"]
  if front:
    caption.append(
      "front dist: mean distance of the final losses to the Pareto front (loss space); "
      f"on front: starts ending within {FRONT_TOLERANCE} of it."
    )
  if stl is not None:
    caption.append("single-task (STL): one network per task, trained on that task alone.")
  steps_note = ", all starts batched" if problem.starts is not None else ""
  caption.append(f"step ms: wall time of one training step{steps_note}.")
  out = [*caption, fmt(header), "  ".join("-" * w for w in widths)]
  out += [fmt(c) for c in lines]
  return "\n".join(out)


def compact(value):
  """``value`` with every float rounded to 6 significant digits (results.json)."""
  if isinstance(value, float):
    return float(f"{value:.6g}")
  if isinstance(value, dict):
    return {k: compact(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [compact(v) for v in value]
  return value
