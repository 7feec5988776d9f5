"""Images in and out: PIL ↔ NumPy the way diffusers' VaeImageProcessor does it, and PNG files that
carry their generation parameters in AUTOMATIC1111's `parameters` text chunk, written atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sdcore.errors import SdcoreError, UsageError


def load_image(source, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image or a path; a clear error for anything unreadable."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise SdcoreError(f"{what} {source} does not exist.") from None
    except (OSError, ValueError) as err:
        raise SdcoreError(f"{what} {source} is not a readable image ({err}).") from None


def image_to_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]  # [1, 3, H, W]


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """Mask -> [1, 1, H, W] float32 of 0/1: grayscale ≥ 0.5 is 1 (white = repaint), as diffusers binarizes."""
    m = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # [H, W]
    return (m >= 0.5).astype(np.float32)[None, None]  # [1, 1, H, W]


def array_to_images(x: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (clamp, ×255, round: diffusers' postprocess)."""
    x = np.clip(x / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # [B, H, W, 3]
    return [Image.fromarray(img) for img in (x * 255.0).round().astype(np.uint8)]


def infotext(params: dict) -> str:
    """A1111's `parameters` text: prompt, `Negative prompt: ...`, then `Key: value, ...`."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    keys = [("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "guidance_scale"), ("Seed", "seed"),
            ("Size", "size"), ("Model hash", "model_hash"), ("Model", "model"), ("Denoising strength", "strength"),
            ("Clip skip", "clip_skip"), ("ToMe ratio", "tome_ratio"), ("Version", "version")]
    values = dict(params)
    if values.get("clip_skip"):  # diffusers' clip_skip=1 (penultimate layer) is A1111's "Clip skip: 2"
        values["clip_skip"] = values["clip_skip"] + 1
    fields = [f"{label}: {values[key]}" for label, key in keys if values.get(key) not in (None, "")]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, params: dict | None = None) -> Path:
    """Write `image` to `path` as PNG with the `parameters` chunk; atomic (temporary file + rename)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"output {path} must end in .png.")
    if not path.parent.exists():
        raise UsageError(f"output folder {path.parent} does not exist.")
    info = PngImagePlugin.PngInfo()
    if params:
        info.add_text("parameters", infotext(params))
    fd, tmp = _new_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _new_file_beside(path: Path) -> tuple[int, Path]:
    """A new, uniquely named file in `path`'s folder (so the rename stays on one file system),
    created with mode 0666 less the umask, as open() would create `path` itself; mkstemp's 0600
    would carry over to the PNG through the rename."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.png.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise SdcoreError(f"cannot create a temporary file beside {path}: every name tried exists.")
