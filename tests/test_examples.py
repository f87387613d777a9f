"""The worked examples at a tiny size: structure, and the claims that hold at any size."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlxtend")

from mtgrad.examples import noisy_labels
from mtgrad.examples import primary_auxiliary


def _finite(*arrays) -> bool:
  return all(np.all(np.isfinite(np.asarray(a))) for a in arrays)


def test_primary_auxiliary_small_run():
  steps = 40
  methods = ("sum", "min_norm")  # the others are unit-tested; each costs a compilation
  results = primary_auxiliary.run(
    steps,
    seed=3,
    num_seeds=2,
    methods=methods,
    labels_per_class=5,
    aux_size=128,
    test_size=200,
    hidden=16,
  )
  assert tuple(results["methods"]) == methods
  assert results["tasks"] == ("digit", "image", "ink")
  for name, r in results["methods"].items():
    assert r["test_accuracy"].shape == (2,)
    assert r["losses"].shape == (2, steps, 3)
    assert r["direction_conflicts"].shape == r["step_rises"].shape == (2, 2)
    assert _finite(r["test_accuracy"], r["losses"]), name
    assert np.all((r["test_accuracy"] >= 0) & (r["test_accuracy"] <= 1))
    # Same split and initialisation for every method: same losses before step 0.
    np.testing.assert_allclose(r["losses"][:, 0], results["methods"]["sum"]["losses"][:, 0])
  min_norm = results["methods"]["min_norm"]
  # Su's guarantee, on the direction the balancer hands to Adam, at every step.
  np.testing.assert_array_equal(min_norm["direction_conflicts"], 0)
  # The auxiliary heads still learn: their losses go down.
  assert np.all(min_norm["losses"][:, -1, 1:] < min_norm["losses"][:, 0, 1:])
  # The auxiliaries dominate the plain sum: its primary loss lags behind.
  summed = results["methods"]["sum"]
  assert np.all(min_norm["losses"][:, -1, 0] < summed["losses"][:, -1, 0])
  table = primary_auxiliary.format_table(results)
  assert all(name in table for name in methods)
  with pytest.raises(ValueError, match="unknown method"):
    primary_auxiliary.run(2, methods=("pcgrad",))


def test_noisy_labels_small_run():
  steps, evals = 60, 3
  methods = ("noisy_only", "min_norm")
  # With 90% uniform noise the noisy labels carry no signal, so the noisy
  # gradient often opposes the clean one and the constraint has work to do.
  results = noisy_labels.run(
    steps, seed=1, num_seeds=2, methods=methods, evals=evals, test_size=200, hidden=16, noise=0.9
  )
  assert tuple(results["methods"]) == methods
  for name, r in results["methods"].items():
    assert r["test_accuracy"].shape == (2,)
    assert r["test_accuracy_curve"].shape == (2, evals)
    assert r["losses"].shape == (2, steps, 2)
    assert r["conflicting_steps"].shape == r["clean_rises"].shape == (2,)
    assert _finite(r["test_accuracy_curve"], r["losses"], r["clean_total_rise"]), name
    np.testing.assert_array_equal(r["test_accuracy"], r["test_accuracy_curve"][:, -1])
  min_norm, noisy_only = results["methods"]["min_norm"], results["methods"]["noisy_only"]
  assert np.all(noisy_only["conflicting_steps"] > 0)
  np.testing.assert_array_equal(min_norm["conflicting_steps"], 0)
  # What remains of the clean loss's rises is second order: a fraction of the
  # unconstrained run's.
  assert np.all(min_norm["clean_total_rise"] < 0.5 * noisy_only["clean_total_rise"])
  table = noisy_labels.format_table(results)
  assert all(name in table for name in methods)
  with pytest.raises(ValueError, match="noise_kind"):
    noisy_labels.load_data(0, clean_per_class=1, noise=0.5, noise_kind="flip", test_size=10)
