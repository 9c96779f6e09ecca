"""Canonical convolutions for XLA:CPU loop bodies: a pure jaxpr rewrite.

Inside a while loop, XLA:CPU compiles a convolution with its fast Eigen kernel
only when its dimension numbers are canonical: input (batch, spatial...,
feature), kernel (spatial..., in, out), output (batch, spatial..., feature),
i.e. NHWC/HWIO for 2-D. Any other layout, which includes every convolution
gradient and any channels-first model, falls back to a generic emitter that is
10-30x slower (jax-ml/jax#12868). Outside loops XLA canonicalizes convolutions
itself; inside a ``lax.scan`` body it does not, so this module does it at the
jaxpr level: each non-canonical ``conv_general_dilated`` becomes transposes
around a canonical one, with every other parameter kept, which is bitwise equal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore


def canonical_dimension_numbers(spatial: int) -> lax.ConvDimensionNumbers:
    """NHWC / HWIO / NHWC dimension numbers (N...C / ...IO / N...C) for ``spatial`` dims."""
    feature = (0, spatial + 1, *range(1, spatial + 1))
    kernel = (spatial + 1, spatial, *range(spatial))
    return lax.ConvDimensionNumbers(lhs_spec=feature, rhs_spec=kernel, out_spec=feature)


def _is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    spatial = len(dimension_numbers.lhs_spec) - 2
    return tuple(dimension_numbers) == tuple(canonical_dimension_numbers(spatial))


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """``conv_general_dilated`` as transpose -> canonical conv -> transpose.

    Strides, padding and dilations are listed per spatial dimension in the
    order of the specs, which the transposes keep, so ``params`` carry over.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    spatial = len(lhs_spec) - 2
    lhs = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(
        lhs, rhs, dimension_numbers=canonical_dimension_numbers(spatial), **params
    )
    # out is (batch, spatial..., feature); out_spec names where each of those goes.
    perm = [0] * (spatial + 2)
    for src, dst in enumerate((out_spec[0], *out_spec[2:], out_spec[1])):
        perm[dst] = src
    return lax.transpose(out, tuple(perm))


def _inline_canonical(eqn: jcore.JaxprEqn) -> list[jcore.JaxprEqn]:
    """The equations of ``_canonical_conv`` wired to ``eqn``'s inputs and output."""
    avals = [v.aval for v in eqn.invars]
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
    closed = jax.make_jaxpr(functools.partial(_canonical_conv, **eqn.params))(*structs)
    (inner_out,) = closed.jaxpr.outvars
    (outer_out,) = eqn.outvars
    if closed.consts or inner_out.aval.shape != outer_out.aval.shape:
        return [eqn]  # not expected; keeping the original is always correct
    rename = dict(zip(closed.jaxpr.invars, eqn.invars))
    rename[inner_out] = outer_out

    def sub(v):
        return v if isinstance(v, jcore.Literal) else rename.get(v, v)

    return [
        e.replace(
            invars=[sub(v) for v in e.invars],
            outvars=[sub(v) for v in e.outvars],
            source_info=eqn.source_info,  # profiles and errors point at the user's conv
        )
        for e in closed.jaxpr.eqns
    ]


def _rewrite_param(value: Any) -> Any:
    """A sub-jaxpr parameter (scan body, cond branches, ...) rewritten; anything else as is."""
    if isinstance(value, jcore.Jaxpr):
        return rewrite_jaxpr(value)
    if isinstance(value, jcore.ClosedJaxpr):
        jaxpr = rewrite_jaxpr(value.jaxpr)
        return value if jaxpr is value.jaxpr else value.replace(jaxpr=jaxpr)
    if isinstance(value, tuple):  # cond's branches
        new = tuple(_rewrite_param(v) for v in value)
        return value if all(a is b for a, b in zip(new, value)) else new
    return value


def rewrite_jaxpr(jaxpr: jcore.Jaxpr) -> jcore.Jaxpr:
    """``jaxpr`` with every non-canonical convolution canonical, at any depth.

    Returns ``jaxpr`` itself (the same object) when there is nothing to rewrite.
    """
    eqns, changed = [], False
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p and not _is_canonical(
            eqn.params["dimension_numbers"]
        ):
            eqns.extend(_inline_canonical(eqn))
            changed = True
            continue
        params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
        if any(params[k] is not eqn.params[k] for k in params):
            eqn = eqn.replace(params=params)
            changed = True
        eqns.append(eqn)
    return jaxpr.replace(eqns=eqns) if changed else jaxpr


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))  # tracers are jax.Arrays


def canonical_convs(fn: Callable, *, platform: str | None = None) -> Callable:
    """``fn`` with every convolution it computes in canonical (NHWC/HWIO) layout.

    Meant as the body of a ``jax.jit``, under any ``static_argnames`` and
    ``donate_argnames``: it traces ``fn`` once, at the jit's own trace, so
    compilation caching is the jit's. Arguments that are not arrays (static
    arguments, functions, None) are passed to ``fn`` as they are. Apply it
    outside any ``vmap`` or ``grad``, so that it sees the convolutions those
    transformations produce.

    Args:
      fn: any function of pytrees of arrays that returns a pytree of arrays.
      platform: the platform it compiles for; ``None`` reads
        ``jax.default_backend()`` when called. Only ``"cpu"`` is rewritten:
        elsewhere ``fn`` runs as it is.

    Returns:
      A function with ``fn``'s signature, outputs and values (bitwise).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> conv = lambda x, w: jax.lax.conv_general_dilated(
      ...     x, w, (1,), "SAME", dimension_numbers=("NCH", "OIH", "NCH"))
      >>> x, w = jnp.ones((2, 3, 8)), jnp.ones((4, 3, 3))
      >>> bool((canonical_convs(conv, platform="cpu")(x, w) == conv(x, w)).all())
      True
      >>> print(jax.make_jaxpr(canonical_convs(conv, platform="cpu"))(x, w))  # doctest: +ELLIPSIS
      { lambda ; a:f32[2,3,8] b:f32[4,3,3]. let
          c:f32[2,8,3] = transpose[permutation=(0, 2, 1)] a
          d:f32[3,3,4] = transpose[permutation=(2, 1, 0)] b
          e:f32[2,8,4] = conv_general_dilated[...] c d
          f:f32[2,4,8] = transpose[permutation=(0, 2, 1)] e
        in (f,) }
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if (platform or jax.default_backend()) != "cpu":
            return fn(*args, **kwargs)
        leaves, tree = jax.tree.flatten((args, kwargs))
        arrays = [leaf for leaf in leaves if _is_array(leaf)]

        def flat(*arrays):
            it = iter(arrays)
            full = [next(it) if _is_array(leaf) else leaf for leaf in leaves]
            a, k = jax.tree.unflatten(tree, full)
            return fn(*a, **k)

        closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*arrays)
        out = jax.core.eval_jaxpr(rewrite_jaxpr(closed.jaxpr), closed.consts, *arrays)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped
