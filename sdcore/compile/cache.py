"""The on-disk cache of built libraries.

The key is the SHA-256 of everything that changes the generated code: the exported Relax module's
text (it already contains the config and the shapes), the target, the pipeline (sdcore's schedule
rules' source included), and the TVM and sdcore versions. Writes are atomic (temporary file, then
rename) and each entry records the library's own SHA-256, so a truncated or corrupt entry is
detected, deleted and rebuilt instead of crashing the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from sdcore.hashing import sha256_file

logger = logging.getLogger("sdcore.compile")


def default_cache_dir() -> Path:
    """`$SDCORE_CACHE`, else `$XDG_CACHE_HOME/sdcore`, else `~/.cache/sdcore`."""
    if os.environ.get("SDCORE_CACHE"):
        return Path(os.environ["SDCORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdcore"


def entry(cache_dir, name: str, key_fields: dict) -> tuple[Path, Path]:
    """(library, metadata) paths of the cache entry for `key_fields` (hashed), named after `name`."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"{name}-{key}.so", cache / f"{name}-{key}.json"


def load(lib_path: Path, meta_path: Path):
    """The cached library, or None when there is none or it is corrupt (then it is deleted)."""
    if not (lib_path.exists() and meta_path.exists()):
        return None
    import tvm

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") != sha256_file(lib_path):
            raise ValueError("checksum mismatch")
        return tvm.runtime.load_module(str(lib_path))
    except Exception as err:  # a corrupt entry is rebuilt, never fatal
        logger.warning("cache entry %s is corrupt (%s): rebuilding", lib_path.name, err)
        for p in (lib_path, meta_path):
            p.unlink(missing_ok=True)
        return None


def store(executable, lib_path: Path, meta_path: Path, meta: dict) -> None:
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        meta = dict(meta, sha256=sha256_file(Path(tmp)), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        os.replace(tmp, lib_path)
        fd, tmp_meta = tempfile.mkstemp(suffix=".json", dir=lib_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp_meta, meta_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
