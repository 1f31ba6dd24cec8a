"""Meshes and the logical-axis rules that place every array on them.

The model names only logical axes ("batch", "seq", "embed", "heads", "experts", ...); `cfg.rules` maps each to mesh
axes ("data", "expert", "fsdp", "context", "tensor"; an axis a mesh is given without has size 1). We build meshes with
`AxisType.Auto` (GSPMD-style): shardings are hints that XLA propagates, set on parameters through jit's in/out
shardings and on activations with `constrain`.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llmjax.errors import LlmjaxError

AXES = ("data", "expert", "fsdp", "context", "tensor")


def mesh_shape(mesh: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Every mesh axis's size (an axis `mesh` leaves out has size 1), the one -1 entry resolved; raises LlmjaxError
    when the sizes cannot cover the devices exactly."""
    sizes = {a: mesh.get(a, 1) for a in AXES}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise LlmjaxError(f"mesh sizes {sizes}: use positive sizes and at most one -1; e.g. --config.mesh.fsdp=-1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise LlmjaxError(f"mesh {sizes}: {n_devices} devices are not divisible by {fixed}; "
                              f"change the mesh sizes so their product divides {n_devices}")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise LlmjaxError(f"mesh {sizes} has {fixed} devices but {n_devices} are present; make the product "
                          f"of mesh sizes {n_devices}, or set one to -1 (e.g. --config.mesh.fsdp=-1)")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def spec(logical: Sequence[str | None], rules: Mapping[str, str], mesh: Mesh,
         shape: Sequence[int] | None = None) -> PartitionSpec:
    """Logical axes -> PartitionSpec. With `shape`, a dimension the mesh axes do not divide stays
    replicated (e.g. GPT-2's 50257-token vocabulary on tensor=2) rather than being padded."""
    out, used = [], set()
    for i, name in enumerate(logical):
        axes = tuple(a for a in (rules[name].split(",") if name else ()) if a and a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if not axes or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def attention_specs(q_BTNH, k_BSKH, rules: Mapping[str, str],
                    mesh: Mesh) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """(q's, k and v's, the [B, T] index arrays') specs for a shard_map attention kernel: query heads are grouped
    over the kv heads only when both split alike, so otherwise neither is split by heads."""
    q_spec = spec(("batch", "seq", "heads", "head_dim"), rules, mesh, q_BTNH.shape)
    kv_spec = spec(("batch", "seq", "kv_heads", "head_dim"), rules, mesh, k_BSKH.shape)
    if q_spec[2] != kv_spec[2]:
        q_spec = PartitionSpec(*q_spec[:2], None, q_spec[3])
        kv_spec = PartitionSpec(*kv_spec[:2], None, kv_spec[3])
    return q_spec, kv_spec, PartitionSpec(*q_spec[:2])


def named(logical: Sequence[str | None], rules: Mapping[str, str], mesh: Mesh,
          shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec(logical, rules, mesh, shape))


def tree_shardings(specs, rules: Mapping[str, str], mesh: Mesh):
    """NamedSharding for every leaf of a tree of ParamSpec (anything with .shape and .axes)."""
    return jax.tree.map(lambda s: named(s.axes, rules, mesh, s.shape), specs,
                        is_leaf=lambda x: hasattr(x, "axes"))


class Constrain(NamedTuple):
    """Activation-sharding hints for use inside jit, `constrain(x_BTD, ("batch", "seq", "act_embed"))`; it also
    carries the mesh and rules for the kernels that place their work themselves (llmjax.models.moe's shard_map).
    Without a mesh it is the identity."""

    mesh: Mesh | None = None
    rules: Mapping[str, str] | None = None

    def __call__(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, named(logical, self.rules, self.mesh, x.shape))


no_constrain = Constrain()


def make_constrain(mesh: Mesh, rules: Mapping[str, str]) -> Constrain:
    return Constrain(mesh, rules)


def batch_sharding(mesh: Mesh, rules: Mapping[str, str]) -> NamedSharding:
    """Rows of any [batch, ...] array split over the data-parallel axes (one sharding for a whole batch tree)."""
    return named(("batch",), rules, mesh)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> range:
    """The contiguous rows of the global batch that this process's devices hold; each process loads only
    these."""
    starts, stops = zip(*((idx[0].start or 0, idx[0].stop or global_shape[0])
                          for idx in sharding.addressable_devices_indices_map(global_shape).values()),
                        strict=True)
    return range(min(starts), max(stops))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict:
    """Assembles each process's rows into global jax.Arrays (multi-process safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
            for k, v in local.items()}
