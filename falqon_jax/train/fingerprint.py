"""A bit-exact fingerprint of a pytree of arrays that does not depend on how they are sharded.

Checkpoints record the fingerprint of what they hold, so a restore can prove that the arrays
it got back are bit for bit the ones saved (a damaged file that still decodes is caught), and
that the frozen part of the model written once per run is the one a step's checkpoint was
saved with.

Every leaf's bits (viewed as unsigned integers) are summed twice with position-dependent odd
weights in uint32 arithmetic. Integer addition modulo 2**32 is associative, so the sums are
the same whatever the mesh, the shard layout or the reduction order; any change of a single
bit changes the first sum. The per-leaf sums, paths, shapes and dtypes are then hashed
(SHA-256) on the host. The reduction runs on the devices where the arrays live (one jitted
pass, no host copy of the arrays).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
# Odd multipliers (the golden ratio's and two other well-mixing 32-bit constants).
_K1, _K2, _K3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (8-byte types give two words per value)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    if size not in _UNSIGNED:
        raise TypeError(f"cannot fingerprint arrays of dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """The row-major position of every element, modulo 2**32."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return index


def _leaf_sums(x: jax.Array) -> jax.Array:
    words = _words(x)
    if words.ndim == 0:
        words = words[None]
    index = _flat_index(words.shape)
    first = jnp.sum(words * (index * jnp.uint32(_K1) | jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum((words ^ (index * jnp.uint32(_K2))) * jnp.uint32(_K3), dtype=jnp.uint32)
    return jnp.stack([first, second])


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_sums(x) for x in leaves])


def fingerprint(tree: Any) -> str | None:
    """A hex digest of the leaves of ``tree`` (arrays, possibly sharded over many hosts), or
    ``None`` for a tree without leaves. Equal trees give equal digests on any mesh; trees that
    differ in any bit, shape, dtype or path give different ones (up to hash collisions)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return None
    sums = _all_sums([leaf for _, leaf in flat])
    if not sums.is_fully_addressable and not sums.is_fully_replicated:  # multi-host
        from jax.experimental import multihost_utils

        sums = multihost_utils.process_allgather(sums, tiled=True)
    sums = np.asarray(sums)
    digest = hashlib.sha256()
    for (path, leaf), (first, second) in zip(flat, sums, strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{tuple(leaf.shape)}|"
                      f"{int(first)}|{int(second)};".encode())
    return digest.hexdigest()[:32]
