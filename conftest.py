"""Test configuration (doctests and tests): strict rank promotion, float32 defaults, CPU."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
