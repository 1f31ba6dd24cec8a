"""Safetensors in and out without a whole model on one host.

Reading: every parameter is a `jax.make_array_from_callback` whose callback reads, for the device asking, only the
rows and columns of the stored tensors that its shard covers (a stacked parameter: one tensor per layer, and per
expert for the experts' weights, so a device holding some experts reads only theirs). Writing:
the safetensors format is an 8-byte header length, a JSON header, then the raw tensors; we write the header from
the shapes and then each tensor as it is gathered, so a host holds one tensor at a time.
"""

import contextlib
import itertools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import safe_open

from llmjax.errors import LlmjaxError
from llmjax.hf.families import Tensor, stacked, stored_key, tensors, view_shape
from llmjax.models import transformer
from llmjax.sharding import tree_shardings

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors a checkpoint may hold that are buffers, not parameters (recomputed by every model that needs them).
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# transformers 5's in-memory experts (every expert in one tensor), which its save_pretrained splits by default
FUSED = (".experts.gate_up_proj", ".experts.down_proj")
NUMPY = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
NAMES = {np.dtype(v): k for k, v in NUMPY.items()}


class Reader:
    """The tensors of a Hugging Face model folder, by name (one model.safetensors, or the shards its index names).

    Each read opens its file, slices and closes it: a file kept open stays memory-mapped, and every page a slice
    touched would then count as this process's memory until the end of the import."""

    def __init__(self, hf_dir: str):
        self.dir = os.path.expanduser(hf_dir)
        if os.path.isfile(os.path.join(self.dir, INDEX)):
            with open(os.path.join(self.dir, INDEX)) as f:
                self.where = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(self.dir, SINGLE)):
            with safe_open(os.path.join(self.dir, SINGLE), "numpy") as f:
                self.where = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise LlmjaxError(f"{hf_dir!r} holds no {SINGLE} nor {INDEX}; llmjax reads safetensors checkpoints "
                              "(convert .bin files with transformers' save_pretrained(safe_serialization=True))")
        self.header: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.where.values())):
            with safe_open(os.path.join(self.dir, file), "numpy") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
                self.header |= {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
        # Some GPT-2 files name tensors without the "transformer." prefix that GPT2LMHeadModel writes.
        self._alias = {f"transformer.{k}": k for k in self.where if not k.startswith(("transformer.", "lm_head."))}

    def name(self, key: str) -> str | None:
        return key if key in self.where else self._alias.get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header[self.name(key)][0]

    def dtype(self, key: str) -> str:
        return self.header[self.name(key)][1]

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        key = self.name(key)
        with safe_open(os.path.join(self.dir, self.where[key]), "numpy") as f:
            return np.asarray(f.get_slice(key)[index])  # a copy already: safetensors reads it into bytes


def check(reader: Reader, model) -> None:
    """Refuses, before anything is read, a checkpoint whose tensors are not exactly the model's (by name and
    shape), naming what is missing or left over."""
    specs = flat(transformer.specs(model))
    wanted: dict[str, tuple[int, ...]] = {}
    for path, t in tensors(model).items():
        view = view_shape(specs[path].shape[stacked(t):], t)
        full = (*view[:-1], view[-1] + t.offset) if t.offset else view
        for index in _indices(specs[path].shape, t):
            key = stored_key(t, index)
            wanted[key] = tuple(max(a, b) for a, b in zip(wanted.get(key, full), full, strict=True))
    missing = sorted(k for k in wanted if reader.name(k) is None)
    known = {reader.name(k) for k in wanted} | ({"lm_head.weight"} if model.tie_embeddings else set())
    extra = sorted(k for k in reader.where if k not in known and not k.endswith(BUFFERS))
    fused = [k for k in extra if k.endswith(FUSED)]
    if fused:
        raise LlmjaxError(f"{reader.dir!r} holds its experts fused ({fused[0]}), as transformers 5 saves them with "
                          "save_pretrained(save_original_format=False); save it with the default (one tensor per "
                          "expert, the Hub's layout)")
    if missing or extra:
        what = f"lacks {_few(missing)}" if missing else f"holds tensors the model has no place for: {_few(extra)}"
        raise LlmjaxError(f"{reader.dir!r} {what}; its config.json does not describe these weights")
    for key, shape in wanted.items():
        if reader.shape(key) != shape:
            raise LlmjaxError(f"{reader.dir!r}: {key} has shape {reader.shape(key)}, its config.json implies {shape}")


def _indices(shape: tuple[int, ...], t: Tensor, index: tuple[slice, ...] = ()) -> list[tuple[int, ...]]:
    """Our parameter's parts (of `shape`, within `index`) that are stored tensors: their index along the stacked
    axes (layers, then experts); one empty index for an unstacked parameter."""
    n = stacked(t)
    index = (*index, *(slice(None),) * (n - len(index)))
    return list(itertools.product(*(range(shape[a])[index[a]] for a in range(n))))


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict by dotted path ("layers.wq")."""
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _unflat(paths: dict) -> dict:
    out: dict = {}
    for path, v in paths.items():
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def _block(reader: Reader, t: Tensor, key: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Our array of `shape` at `index`, read from the stored tensor `key`: for each view axis, only the range its
    first dimension's slice covers (whole rows of the inner dimensions), then the inner slices."""
    groups = [g for g in ((0, t.cut), (t.cut, len(shape))) if g[0] < g[1]]
    lead = (slice(None),) if t.cut == 0 else ()  # the view's first axis of 1
    spans, sizes, inner_index = [], [], []
    for n, (lo, hi) in enumerate(groups):
        start, stop, _ = index[lo].indices(shape[lo])
        inner = math.prod(shape[lo + 1:hi])
        shift = t.offset if n == len(groups) - 1 else 0
        spans.append(slice(start * inner + shift, stop * inner + shift))
        sizes += [stop - start, *shape[lo + 1:hi]]
        inner_index += [slice(None), *index[lo + 1:hi]]
    data = reader.read(key, lead + tuple(spans[::-1] if t.transpose else spans))
    return (data.T if t.transpose else data).reshape(sizes)[tuple(inner_index)]


def _read(reader: Reader, t: Tensor, shape: tuple[int, ...], dtype, index: tuple[slice, ...]) -> np.ndarray:
    """One device's shard of one parameter; a stacked one reads one tensor per layer (and expert) of its shard."""
    n = stacked(t)
    parts = _indices(shape, t, index[:n])
    blocks = [_block(reader, t, stored_key(t, part), shape[n:], index[n:]) for part in parts]
    lead = [len(range(shape[a])[index[a]]) for a in range(n)]
    return np.stack(blocks).reshape(*lead, *blocks[0].shape).astype(dtype, copy=False)


def load(reader: Reader, model, rules, mesh: Mesh) -> transformer.Params:
    """The model's parameters from the checkpoint (see `check`), sharded by `rules` on `mesh`, in
    model.param_dtype; each device reads its own shard."""
    check(reader, model)
    specs = transformer.specs(model)
    shardings = flat(tree_shardings(specs, rules, mesh))
    dtype = jnp.dtype(model.param_dtype)
    shapes = {path: spec.shape for path, spec in flat(specs).items()}
    return _unflat({path: jax.make_array_from_callback(shapes[path], shardings[path],
                                                       partial(_read, reader, t, shapes[path], dtype))
                    for path, t in tensors(model).items()})


def host(x: jax.Array) -> np.ndarray:
    """One tensor on this host, gathered from wherever its shards live (other hosts too)."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def exported(params: transformer.Params, model, dtype) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """(name, shape, make) of every stored tensor, in the family's layout; `make()` gathers it onto this host in
    `dtype`. Tensors that hold several of ours (GPT-2's fused q, k, v) are concatenated in offset order."""
    by_path = flat(params)
    by_key: dict[str, list[tuple[Tensor, str, tuple[int, ...]]]] = {}
    for path, t in tensors(model).items():
        for index in _indices(by_path[path].shape, t):
            by_key.setdefault(stored_key(t, index), []).append((t, path, index))

    def order(key: str) -> int:  # embeddings, then layer by layer, then the rest, as transformers writes them
        layer = re.search(r"\.(\d+)\.", key)
        return int(layer[1]) if layer else -1 if re.search(r"embed|wte|wpe", key) else model.n_layers

    for key in sorted(by_key, key=order):
        parts = sorted(by_key[key], key=lambda p: p[0].offset)

        def make(parts=parts):
            pieces = []
            for t, path, index in parts:
                x = by_path[path][index] if index else by_path[path]
                pieces.append(host(x).astype(dtype).reshape(view_shape(x.shape, t._replace(transpose=False))))
            joined = np.concatenate(pieces, axis=-1)
            return np.ascontiguousarray(joined.T if parts[0][0].transpose else joined)

        shapes = [view_shape(by_path[p].shape[len(index):], t) for t, p, index in parts]
        yield key, (*shapes[0][:-1], sum(s[-1] for s in shapes)), make


def write(out_dir: str, tensors_: list[tuple[str, tuple[int, ...], Callable]], dtype, shard_bytes: int,
          progress: Callable[[str], None] = lambda key: None) -> list[str]:
    """Writes safetensors shards of at most `shard_bytes` (a bigger tensor gets its own) and, for more than one,
    the index transformers reads; returns the file names. Only process 0 writes, but all gather."""
    item = np.dtype(dtype).itemsize
    shards, size = [[]], 0
    for entry in tensors_:
        n = math.prod(entry[1]) * item
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    writer = jax.process_index() == 0
    for name, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, _ in shard:
            header[key] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                           "data_offsets": [offset, offset + math.prod(shape) * item]}
            offset += math.prod(shape) * item
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(out_dir, name), "wb") if writer else contextlib.nullcontext() as f:
            if writer:
                f.write(struct.pack("<Q", len(text)) + text)
            for key, _, make in shard:
                data = make()
                if writer:
                    f.write(data.tobytes())
                progress(key)
    if len(names) > 1 and writer:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
        total = sum(math.prod(s) * item for _, s, _ in tensors_)
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
