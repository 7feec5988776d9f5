"""SHA-256 of files, read in 1 MiB chunks (`hashlib.file_digest` would need Python 3.11)."""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

_CHUNK = 1 << 20


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """Hex SHA-256 of the files' contents one after another (one file: the file's own SHA-256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of one file."""
    return sha256_files([path])
