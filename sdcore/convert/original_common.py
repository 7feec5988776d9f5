"""Shared machinery for reading original-format (CompVis / Stability) checkpoints.

Each component (UNet, VAE, text encoder) describes its original -> diffusers renames as one table of
`ModuleRename` rows, built from the layout read off the checkpoint. `convert_by_table` applies the
table and `check_converted` holds the result to the parameters of sdcore's own model for the config
read off the checkpoint, so every tensor is accounted for: mapped, or an error that names it.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from sdcore import weights
from sdcore.errors import SdcoreError


@dataclasses.dataclass(frozen=True)
class ModuleRename:
    """One module of the original checkpoint and its diffusers/transformers name.

    `inner` renames the first path components below the module ("in_layers.2" -> "conv1"); names
    not in it are the same on both sides. `conv1x1_to_linear` marks modules whose 1x1 convolution
    weights [O, I, 1, 1] become Linear weights [O, I] (the legacy VAE attention).
    """

    original: str
    diffusers: str
    inner: Mapping[str, str] = dataclasses.field(default_factory=dict)
    conv1x1_to_linear: bool = False


def _longest_prefix(name: str, table: Mapping[str, object]) -> tuple[str, str] | None:
    """Split `name` at a dot into (prefix, rest) with the longest prefix that is a key of `table`."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, ".".join(parts[cut:])
    return None


def convert_by_table(
    component: str,
    prefix: str,
    tensors: Mapping[str, np.ndarray],
    table: list[ModuleRename],
    sources: Mapping[str, str] | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """Rename `tensors` (original names without the component `prefix`) with `table`.

    A row may also name a single tensor rather than a module ("positional_embedding"). Returns
    diffusers name -> (original key, array); `sources` overrides the original key shown in messages
    for tensors that were split off a fused one. The arrays are the inputs themselves or reshaped
    views of them: no arithmetic, dtype unchanged.
    """
    rows = {row.original: row for row in table}
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in tensors.items():
        full = (sources or {}).get(name, prefix + name)
        if name in rows:
            out[rows[name].diffusers] = (full, array)
            continue
        split = _longest_prefix(name, rows)
        if split is None:
            raise SdcoreError(f"unknown key {full}: no {component} module of the inferred architecture has this name.")
        row = rows[split[0]]
        rest = split[1]
        inner = _longest_prefix(rest, row.inner)
        if inner is not None:
            rest = row.inner[inner[0]] + "." + inner[1]
        if row.conv1x1_to_linear and array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array.reshape(array.shape[:2])  # [O, I, 1, 1] -> [O, I]
        new = row.diffusers + "." + rest
        if new in out:
            raise SdcoreError(f"{component} keys {out[new][0]} and {full} both map to {new}.")
        out[new] = (full, array)
    return out


def check_converted(
    component: str,
    converted: Mapping[str, tuple[str, np.ndarray]],
    config: dict,
    table: list[ModuleRename],
    prefix: str,
) -> dict[str, np.ndarray]:
    """Hold the renamed tensors to the parameters of sdcore's model for `config` (weights.check_state_dict);
    `component` is a weights.COMPONENTS name. Returns diffusers name -> array."""
    sources = {name: full for name, (full, _array) in converted.items()}
    return weights.check_state_dict(
        component, {name: array for name, (_full, array) in converted.items()},
        weights.expected_shapes(component, config),
        origin=lambda name: sources.get(name) or original_name(name, table, prefix))


def original_name(diffusers_name: str, table: list[ModuleRename], prefix: str) -> str:
    """The original key a diffusers name comes from (for messages), by the same table read backwards."""
    rows = {row.diffusers: row for row in table}
    if diffusers_name in rows:
        return prefix + rows[diffusers_name].original
    split = _longest_prefix(diffusers_name, rows)
    if split is None:
        return prefix + diffusers_name
    row = rows[split[0]]
    rest = split[1]
    backwards = {new: old for old, new in row.inner.items()}
    inner = _longest_prefix(rest, backwards)
    if inner is not None:
        rest = backwards[inner[0]] + "." + inner[1]
    return prefix + row.original + "." + rest


def indices(names, prefix: str) -> list[int]:
    """Sorted distinct integers N of names that start with `prefix` + "N." (e.g. block numbers)."""
    found = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def require_contiguous(component: str, what: str, numbers: list[int]) -> int:
    """`numbers` must be 0..N-1 (a gap means a truncated or edited checkpoint); return N."""
    if numbers != list(range(len(numbers))):
        gap = next(i for i in range(len(numbers) + 1) if i not in numbers)
        raise SdcoreError(
            f"{component}: {what} {gap} is missing although {what} up to {numbers[-1]} are present: "
            "the checkpoint is truncated."
        )
    return len(numbers)


def get(component: str, tensors: Mapping[str, np.ndarray], name: str, prefix: str, ndim: int) -> np.ndarray:
    """A tensor the layout is read from; a clear error when it is absent or has the wrong rank."""
    if name not in tensors:
        raise SdcoreError(f"{component}: missing key {prefix}{name}, needed to read the architecture.")
    array = tensors[name]
    if array.ndim != ndim:
        raise SdcoreError(
            f"{component} key {prefix}{name}: expected a {ndim}-D tensor, found shape {tuple(array.shape)}."
        )
    return array
