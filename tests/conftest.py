"""Shared fixtures: small random-weight checkpoints built with diffusers (the references), converted once
per test session, and a compile cache shared by the session's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile-cache")


class Checkpoints:
    """Builds (once) diffusers folders / single files of the tiny presets and their conversions."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple, Path] = {}

    def diffusers(self, preset: str = "tiny-sd1", inpainting: bool = False, prediction_type: str = "epsilon") -> Path:
        key = ("diffusers", preset, inpainting, prediction_type)
        if key not in self._made:
            from sdcore.testing.checkpoints import write_diffusers

            out = self.root / "-".join(["diffusers", preset, "inpaint" if inpainting else "base", prediction_type])
            write_diffusers(out, preset, inpainting, seed=0, prediction_type=prediction_type)
            self._made[key] = out
        return self._made[key]

    def single_file(self, preset: str = "tiny-sd1", inpainting: bool = False, fmt: str = "safetensors") -> Path:
        key = ("single", preset, inpainting, fmt)
        if key not in self._made:
            from sdcore.testing.checkpoints import write_single_file

            out = self.root / f"single-{preset}-{'inpaint' if inpainting else 'base'}.{fmt}"
            write_single_file(out, preset, inpainting, seed=0, fmt=fmt)
            self._made[key] = out
        return self._made[key]

    def converted(self, preset: str = "tiny-sd1", inpainting: bool = False, prediction_type: str = "epsilon") -> Path:
        key = ("converted", preset, inpainting, prediction_type)
        if key not in self._made:
            from sdcore.convert import convert

            src = self.diffusers(preset, inpainting, prediction_type)
            out = self.root / f"sdcore-{src.name}"
            convert(src, out, log=lambda *_: None)
            self._made[key] = out
        return self._made[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))
