"""On-disk entries: `<dir>/<key[:2]>/<key>/` holding `module.py` (kernels, fallbacks, wrapper)
and `meta.json` (target, versions, pass counters, timings, file hashes, created, last used, hits).

Writes are atomic (a temporary directory renamed into place: of several processes compiling
one graph, one entry survives). Every file's hash is checked before its code is imported; an
entry that fails the check is reported and rebuilt, never executed. The cache directory is
created 0700; one owned by another user or writable by everyone is refused. A full disk or any
other OS error degrades to running without the cache, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

MODULE_FILE = "module.py"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("flagtree"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CacheRefused(Exception):
    """The cache directory or an entry is not safe to use."""


@dataclass
class CacheEntry:
    key: str
    path: Path
    meta: dict

    @property
    def module_source(self) -> str:
        return (self.path / MODULE_FILE).read_text()


class KernelCache:
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._warned = False

    # -- safety --------------------------------------------------------------------------------

    def _check_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.directory.stat()
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CacheRefused(f"{self.directory} belongs to another user")
        if info.st_mode & stat.S_IWOTH:
            raise CacheRefused(f"{self.directory} is writable by everyone")

    def entry_path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def verify(self, key: str) -> str | None:
        """None when the entry is intact, else what is wrong with it."""
        path = self.entry_path(key)
        try:
            meta = json.loads((path / META_FILE).read_text())
            if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
                return "owned by another user"
            for name, digest in meta["files"].items():
                if _sha256((path / name).read_bytes()) != digest:
                    return f"{name} does not match its hash"
        except (OSError, ValueError, KeyError) as error:
            return f"unreadable: {error}"
        return None

    # -- use -----------------------------------------------------------------------------------

    def load(self, key: str) -> tuple[CacheEntry | None, str | None]:
        """(entry, None) on a hit, (None, None) on a miss, (None, problem) for a bad entry."""
        path = self.entry_path(key)
        try:
            self._check_directory()
            if not path.exists():
                return None, None
            problem = self.verify(key)
            if problem is not None:
                return None, problem
            meta = json.loads((path / META_FILE).read_text())
            meta["hits"] = meta.get("hits", 0) + 1
            meta["last_used"] = time.time()
            self._write_json(path / META_FILE, meta)
            return CacheEntry(key, path, meta), None
        except (OSError, CacheRefused) as error:
            self._degrade(error)
            return None, None

    def store(self, key: str, module_source: str, meta: dict) -> CacheEntry | None:
        """Write an entry atomically; an existing intact entry (another process won) is kept."""
        try:
            self._check_directory()
            final = self.entry_path(key)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{uuid.uuid4().hex[:8]}-", dir=final.parent))
            data = module_source.encode()
            (scratch / MODULE_FILE).write_bytes(data)
            now = time.time()
            meta = {**meta, "key": key, "files": {MODULE_FILE: _sha256(data)}, "created": now,
                    "last_used": now, "hits": 0}
            (scratch / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            if final.exists() and self.verify(key) is not None:
                shutil.rmtree(final, ignore_errors=True)  # a corrupted entry: replace it
            try:
                os.rename(scratch, final)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)  # another process stored it first
            return CacheEntry(key, final, json.loads((final / META_FILE).read_text()))
        except (OSError, CacheRefused) as error:
            self._degrade(error)
            return None

    def _write_json(self, path: Path, data: dict) -> None:
        scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        scratch.write_text(json.dumps(data, indent=1, default=str))
        os.replace(scratch, path)

    def _degrade(self, error: Exception) -> None:
        if not self._warned:
            warnings.warn(f"flagtree: compiled-artifact cache unavailable ({error}); compiling without it", stacklevel=3)
            self._warned = True
