"""`mtgrad compare` at the tiny size: tables, results.json, figures, errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from mtgrad import cli
from mtgrad._src.compare import problems
from mtgrad._src.compare import progress
from mtgrad._src.compare import runner

# One worker runs the whole module, so the module-scoped tiny run happens once.
pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One tiny run of the default problems with two methods (plus ``sum``)."""
  out = tmp_path_factory.mktemp("compare")
  capture = io.StringIO()
  stdout, sys.stdout = sys.stdout, capture
  try:
    code = cli.main(
      [
        "compare",
        "--size",
        "tiny",
        "--methods",
        "mean,inverse_loss",
        "--out",
        str(out / "run"),
        "--figures",
        str(out / "figures"),
        "--no-progress",
      ]
    )
  finally:
    sys.stdout = stdout
  return code, capture.getvalue(), out


def test_tiny_run_prints_one_table_per_default_problem(tiny_run):
  code, text, _ = tiny_run
  assert code == 0
  tables = text.split("\n\n")
  assert len([t for t in tables if "Δm% vs sum" in t]) == len(problems.DEFAULT)
  for table in tables[: len(problems.DEFAULT)]:
    assert "Δm% = (100/T) Σ_t (-1)^h_t (M_t - B_t) / B_t" in table
    for method in ("sum", "mean", "inverse_loss"):
      assert f"\n{method} " in table
  toy_table, _, mnist_table = tables[:3]
  assert "front dist" in toy_table and "on front" in toy_table
  assert "Δm% vs STL" in mnist_table and "\nsingle-task " in mnist_table
  assert "error" not in text


def test_results_json_structure(tiny_run):
  _, _, out = tiny_run
  results = json.loads((out / "run" / "results.json").read_text())
  assert results["meta"]["methods"] == ["sum", "mean", "inverse_loss"]
  assert list(results["problems"]) == list(problems.DEFAULT)
  for name, entry in results["problems"].items():
    num_tasks = len(entry["tasks"])
    assert [r["method"] for r in entry["results"]] == ["sum", "mean", "inverse_loss"]
    for r in entry["results"]:
      assert r["error"] is None and r["finite"]
      assert len(r["metrics"]) == num_tasks and r["step_ms"] > 0 and r["compile_s"] > 0
      assert isinstance(r["delta_m_sum"], float) and (r["method"] != "sum" or r["delta_m_sum"] == 0)
      weights = r["curves"]["weights"]
      assert len(weights) == len(r["curves"]["step"]) and len(weights[0]) == num_tasks
      assert len(r["curves"]["train_losses"]) == len(r["curves"]["step"])
      assert r["curves"]["step"][-1] == entry["steps"]
    assert all((out / "run" / p).is_file() for p in entry["plots"])
    assert f"{name}_curves.png" in entry["plots"] and f"{name}_weights.png" in entry["plots"]
  toy = results["problems"]["toy"]
  assert {"toy_trajectories.png", "toy_loss_space.png"} <= set(toy["plots"])
  for r in toy["results"]:
    assert len(r["trajectories"]) == 5 and len(r["front_distance"]) == 5
    assert r["trajectories"][0][0] == [-8.5, 7.5]
  stl = results["problems"]["multimnist"]["single_task"]
  assert stl["method"] == "single-task" and len(stl["metrics"]) == 2
  assert stl["delta_m_stl"] == 0.0


def test_readme_figures_are_written_and_small(tiny_run):
  _, _, out = tiny_run
  for name in ("compare_toy.png", "compare_regression2.png"):
    path = out / "figures" / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000


def test_failing_method_is_reported_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
  real = runner.balancer

  def balancer(method, num_tasks, seed):
    if method == "mean":
      raise RuntimeError("mean is broken")
    return real(method, num_tasks, seed)

  monkeypatch.setattr(runner, "balancer", balancer)
  args = ["compare", "--problem", "toy", "--size", "tiny", "--methods", "mean", "--steps", "2"]
  code = cli.main([*args, "--out", str(tmp_path), "--no-plots"])
  assert code == 1
  captured = capsys.readouterr()
  assert re.search(r"\nmean +error: RuntimeError: mean is broken\n", captured.out)
  assert "1 run(s) failed: toy/mean" in captured.err
  rows = json.loads((tmp_path / "results.json").read_text())["problems"]["toy"]["results"]
  assert rows[0]["error"] is None and rows[1]["error"] == "RuntimeError: mean is broken"


def test_clear_errors_before_any_training(monkeypatch):
  with pytest.raises(ValueError, match="unknown method"):
    cli.main(["compare", "--methods", "pcgard"])
  with pytest.raises(ValueError, match="unknown problem 'mnist'"):
    cli.main(["compare", "--problem", "mnist"])
  with pytest.raises(SystemExit):
    cli.main(["compare", "--steps", "0"])
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
  with pytest.raises(ImportError, match=r"mtgrad\[compare\]"):
    cli.main(["compare", "--problem", "toy", "--size", "tiny"])


def test_progress_bar_draws_only_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  screen = Terminal()
  bar = progress.Progress("toy", 4, stream=screen)
  bar.update(2, "cagrad")
  assert "[toy] [##########..........] 2/4 cagrad" in screen.getvalue()
  bar.close()
  assert screen.getvalue().endswith("\r")
  for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
    bar = progress.Progress("toy", 4, enabled=enabled, stream=stream)
    bar.update(1, "x")
    bar.close()
    assert stream.getvalue() == ""


def test_python_dash_m_mtgrad_runs_the_cli():
  result = subprocess.run(
    [sys.executable, "-m", "mtgrad", "compare", "--help"], capture_output=True, text=True
  )
  assert result.returncode == 0
  assert "--methods" in result.stdout and "--size" in result.stdout
