"""Strict, shared test configuration.

Four fake CPU devices are configured before JAX creates its backend, so the
sharding tests have several devices on a one-CPU machine.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting afterwards."""
    with jax.enable_x64(True):
        yield
