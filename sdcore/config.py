"""Reading a diffusers/transformers config dict (a component's config.json) into sdcore's frozen config.

One `from_dict` for UNetConfig, VAEConfig and CLIPTextConfig. Every key of the dict is one of:
- a field of the dataclass: honoured (the network is built from it);
- in the class's `IGNORED` table, with the reason it cannot change what sdcore computes
  (bookkeeping, training-only settings);
- in the class's `UNSUPPORTED_OPTIONS` table: an option sdcore does not implement, accepted only
  with a value that leaves the network as sdcore builds it (the reference's default, or the null
  that real SD1.x/SD2.x configs carry); any other value is refused with one line naming it.
Any other key is refused with one line naming it, so nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, ClassVar, Mapping

from sdcore.errors import SdcoreError


def _frozen(value):
    """JSON lists as tuples (nested too), so a frozen config holds only hashable values."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


class ConfigBase:
    """Mixin of the frozen config dataclasses: the tables below and the one `from_dict`."""

    TITLE: ClassVar[str] = "model"  # how messages name the component ("UNet config: ...")
    # the key that names the reference class, and the one value sdcore reads ("_class_name", "AutoencoderKL")
    CLASS_KEY: ClassVar[tuple[str, str] | None] = None
    IGNORED: ClassVar[Mapping[str, str]] = {}  # key -> why it changes nothing sdcore computes
    UNSUPPORTED_OPTIONS: ClassVar[Mapping[str, tuple]] = {}  # key -> the values accepted (all inert)
    POSITIVE: ClassVar[frozenset[str]] = frozenset()  # fields whose integers (in lists too) must be >= 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The config of a diffusers/transformers config dict; anything sdcore cannot honour raises."""
        if not isinstance(d, Mapping):
            raise SdcoreError(f"{cls.TITLE} config must be a JSON object, found {type(d).__name__}.")
        if cls.CLASS_KEY is not None:
            key, expected = cls.CLASS_KEY
            found = d.get(key, expected)
            if found != expected:
                raise SdcoreError(f"{cls.TITLE} {key} {found!r} is not supported (expected {expected!r}).")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | set(cls.IGNORED) | set(cls.UNSUPPORTED_OPTIONS)
        if cls.CLASS_KEY is not None:
            known.add(cls.CLASS_KEY[0])
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise SdcoreError(f"{cls.TITLE} config has unknown keys: {', '.join(unknown)} (sdcore does not "
                              f"implement them).")
        for key, accepted in cls.UNSUPPORTED_OPTIONS.items():
            if key in d and not any(_same(d[key], a) for a in accepted):
                raise SdcoreError(f"{cls.TITLE} config: {key}={d[key]!r} is not supported by sdcore (it "
                                  f"implements {' or '.join(repr(a) for a in accepted)}).")
        kwargs = {k: _frozen(v) for k, v in d.items() if k in fields}
        hints = typing.get_type_hints(cls)
        for key, value in kwargs.items():
            positive = key in cls.POSITIVE
            if not _matches(value, hints[key], positive):
                if hints[key] is type(None):
                    raise SdcoreError(f"{cls.TITLE} config: {key}={d[key]!r} is not supported by sdcore (it "
                                      f"implements null).")
                raise SdcoreError(f"{cls.TITLE} config: {key} must be {_describe(hints[key], positive)}, found "
                                  f"{d[key]!r}.")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SdcoreError(f"cannot read the {cls.TITLE} config {os.fspath(path)}: {err}.") from None
        return cls.from_dict(d)


def _matches(value, hint, positive: bool) -> bool:
    """Whether a JSON value (lists already tuples) has the type of a field's annotation."""
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or not positive)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a, positive) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0], positive) for v in value)
        return len(value) == len(args) and all(_matches(v, a, positive) for v, a in zip(value, args))
    raise TypeError(f"config annotation {hint!r} is not one sdcore/config.py reads")


def _describe(hint, positive: bool) -> str:
    """A field's annotation in words, for messages ("an integer or a list of integers")."""
    if hint is type(None):
        return "null"
    words = {bool: "true or false", int: "a positive integer" if positive else "an integer", float: "a number",
             str: "a string"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, positive) for a in args)
    plural = {bool: "booleans", int: "positive integers" if positive else "integers", float: "numbers",
              str: "strings"}[args[0]]
    if len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {plural}"
    return f"a list of {len(args)} {plural}"


def _same(value, accepted) -> bool:
    # True == 1 in Python: a bool option must not accept 1, nor a numeric one True
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def check_sample_size(title: str, value) -> None:
    """diffusers' `sample_size`: one int, or [height, width] (both legal in its configs)."""
    sizes = value if isinstance(value, tuple) else (value,)
    if len(sizes) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise SdcoreError(f"{title} config: sample_size must be a positive integer or [height, width], "
                          f"found {value!r}.")


def sample_hw(value) -> tuple[int, int]:
    """(height, width) of a checked sample_size."""
    return (value[0], value[-1]) if isinstance(value, tuple) else (value, value)
