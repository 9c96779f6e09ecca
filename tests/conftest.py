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


_compilations = [0]


def _count_compilation(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compilations[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


@pytest.fixture
def compilations():
    """A callable returning the number of XLA compilations since the test started."""
    start = _compilations[0]
    return lambda: _compilations[0] - start


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Each test module starts with JAX's caches cleared: executables compiled for earlier
    modules are freed instead of piling up in the one test process (a full run of the
    suite compiles thousands of programs)."""
    jax.clear_caches()
    yield
