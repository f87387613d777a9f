"""Test configuration (doctests and tests): strict rank promotion, float32 defaults, CPU."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(items):
  # Tests of one method share its compiled functions (tests/harness.py caches
  # them per process): with `pytest -n 2 --dist loadgroup` they run on one
  # worker, so each method compiles once instead of once per worker.
  import pytest

  for item in items:
    name = getattr(getattr(item, "callspec", None), "params", {}).get("name")
    if name is not None:
      item.add_marker(pytest.mark.xdist_group(name))
