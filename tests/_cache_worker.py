"""A fit with ``compile_cache=``, run as a fresh process by the compilation cache tests.

Usage: python _cache_worker.py CACHE_DIR OUT.npz

Writes the result and how many of the run's compilations JAX's persistent cache
served (``/jax/compilation_cache/cache_hits``) or missed (``cache_misses``).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scanfit

events = {"cache_hits": 0, "cache_misses": 0}


def count(event: str, **kwargs) -> None:
    name = event.rsplit("/", 1)[-1]
    if name in events:
        events[name] += 1


def train(cache_dir=None):
    """A small MLP (shapes no other test uses: nothing is in JAX's in-memory cache yet)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(24, 8, 5)).astype(np.float32)
    y = np.sin(x.sum(-1)).astype(np.float32)
    params = {
        "w1": rng.normal(size=(5, 13)).astype(np.float32) * 0.3,
        "w2": rng.normal(size=(13,)).astype(np.float32) * 0.3,
    }

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((jnp.tanh(xb @ p["w1"]) @ p["w2"] - yb) ** 2)

    return scanfit.fit(
        loss, params, optax.adam(0.01), (x, y), epochs=2, chunk_steps=8, progress=False,
        compile_cache=cache_dir,
    )  # fmt: skip


def main() -> None:
    jax.monitoring.register_event_listener(count)
    res = train(sys.argv[1])
    np.savez(
        sys.argv[2],
        losses=np.asarray(res.losses),
        w1=np.asarray(res.params["w1"]),
        w2=np.asarray(res.params["w2"]),
        **events,
    )


if __name__ == "__main__":
    main()
