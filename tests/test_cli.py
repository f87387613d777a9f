"""`mtgrad compare` at a tiny size: output structure and files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtgrad import cli


def test_compare_prints_table_and_writes_results(tmp_path, capsys):
  code = cli.main(
    [
      "compare",
      "--problem",
      "regression2",
      "--methods",
      "mean,inverse_loss",
      "--steps",
      "3",
      "--out",
      str(tmp_path),
    ]
  )
  assert code == 0
  out = capsys.readouterr().out
  assert "Δm% vs sum" in out
  for method in ("sum", "mean", "inverse_loss"):
    assert f"\n{method} " in out
  report = json.loads((tmp_path / "results.json").read_text())
  rows = report["regression2"]["results"]
  assert [r["method"] for r in rows] == ["sum", "mean", "inverse_loss"]
  for r in rows:
    assert len(r["test_losses"]) == 2 and r["finite"] and r["step_ms"] > 0
    np.testing.assert_allclose(np.sum(r["final_weights"]) > 0, True)


def test_delta_m_is_relative_change():
  assert cli.delta_m([2.0, 1.0], [1.0, 1.0]) == pytest.approx(50.0)


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown method"):
    cli.main(["compare", "--methods", "pcgard", "--steps", "1"])
