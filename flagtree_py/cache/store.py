"""On-disk entries: `<dir>/<key[:2]>/<key>/` holding `module.py` (kernels, fallbacks, wrapper)
and `meta.json` (target, versions, pass counters, timings, file hashes, created, last used, hits).

Writes are atomic (a temporary directory renamed into place: of several processes compiling
one graph, one entry survives). Every file's hash is checked before its code is imported; an
entry that fails the check is reported and rebuilt, never executed. The cache directory is
created 0700; one owned by another user or writable by everyone is refused. A full disk or any
other OS error degrades to running without the cache, with one warning.

For `flagtree cache`: entries are listed, removed, evicted least recently used first down to a size,
and moved between machines as .tar.gz bundles whose import checks every path and file hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flagtree_py.cache.binaries import BINARIES_DIR, BinaryStore, place_directory, remove_directory
from flagtree_py.cache.links import GraphLinks

MODULE_FILE = "module.py"
META_FILE = "meta.json"

#: what an entry directory's name (a key) and the names of its files may be: nothing a path can escape with
_KEY = re.compile(r"[0-9a-f]{4,64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: a bundle member larger than this is refused unread (generated modules are kilobytes)
MAX_BUNDLE_FILE_BYTES = 64 << 20


def default_cache_dir() -> Path:
    """The platform's user cache directory (platformdirs), or the XDG one where that is missing."""
    try:
        import platformdirs
    except ImportError:  # e.g. an environment that got flagtree without its dependencies
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flagtree"
    return Path(platformdirs.user_cache_dir("flagtree"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CacheRefused(Exception):
    """The cache directory or an entry is not safe to use."""


#: the GEMM autotuner's winners: an extra file of the compiled graph's entry (`KernelCache.add_extra`)
AUTOTUNE_FILE = "autotune.json"


@dataclass
class CacheEntry:
    key: str
    path: Path
    meta: dict

    @property
    def module_source(self) -> str:
        return (self.path / MODULE_FILE).read_text()

    def binaries(self, arch: str) -> dict[str, tuple[dict, dict[str, Path]]]:
        """{kernel: (launch signature, {"cubin"|"ptx"|"json": path})} built for `arch` ("sm90")."""
        found = {}
        for kernel, per_arch in self.meta.get("binaries", {}).items():
            built = per_arch.get(arch)
            if built is not None:
                found[kernel] = (built["signature"], {kind: self.path / name for kind, name in built["files"].items()})
        return found

    def extra(self, name: str) -> bytes | None:
        """An extra file stored with `KernelCache.add_extra` (autotune winners...), or None."""
        file = self.meta.get("extras", {}).get(name)
        return None if file is None else (self.path / file).read_bytes()

    def autotune_winners(self) -> dict:
        """The GEMM autotuner's winners ({"kernel/bucket": tile}) stored in this entry, {} if none."""
        try:
            data = json.loads(self.extra(AUTOTUNE_FILE) or b"{}")
        except (OSError, ValueError):
            return {}
        return data.get("winners", {}) if isinstance(data, dict) else {}


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

    def usable(self) -> bool:
        """Whether the directory passes the safety checks (created 0700 if missing); warns once if not."""
        try:
            self._check_directory()
            return True
        except (OSError, CacheRefused) as error:
            self._degrade(error)
            return False

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
            data = module_source.encode()
            now = time.time()
            meta = {**meta, "key": key, "files": {MODULE_FILE: _sha256(data)}, "created": now,
                    "last_used": now, "hits": 0}
            # a corrupted entry is replaced; an intact one (another process stored it first) is kept
            place_directory(final, {MODULE_FILE: data, META_FILE: json.dumps(meta, indent=1, default=str)},
                            replace=final.exists() and self.verify(key) is not None)
            return CacheEntry(key, final, json.loads((final / META_FILE).read_text()))
        except (OSError, CacheRefused) as error:
            self._degrade(error)
            return None

    def peek(self, key: str) -> CacheEntry | None:
        """An intact entry, read without counting a hit (None if missing or damaged)."""
        if self.verify(key) is not None:
            return None
        path = self.entry_path(key)
        return CacheEntry(key, path, json.loads((path / META_FILE).read_text()))

    def add_files(self, key: str, files: dict[str, bytes], update_meta) -> CacheEntry | None:
        """Add files to an intact entry: each written atomically, then meta.json (their hashes listed
        with the others, so verify, export and import cover them) after `update_meta(meta)` changed it.

        Two processes adding files to one entry at once may lose one's listing (meta.json is replaced
        whole); its files then stay unlisted, never loaded, and the next `flagtree compile` adds them.
        """
        try:
            problem = self.verify(key)
            if problem is not None:
                raise ValueError(f"entry {key} is damaged: {problem}")
            path = self.entry_path(key)
            for name, data in files.items():
                if name == META_FILE or not _FILE_NAME.fullmatch(name):
                    raise ValueError(f"bad file name {name!r}")
                scratch = path / f".{name}.{uuid.uuid4().hex[:8]}"
                scratch.write_bytes(data)
                os.replace(scratch, path / name)
            meta = json.loads((path / META_FILE).read_text())
            meta["files"].update({name: _sha256(data) for name, data in files.items()})
            update_meta(meta)
            self._write_json(path / META_FILE, meta)
            return CacheEntry(key, path, meta)
        except (OSError, CacheRefused) as error:
            self._degrade(error)
            return None

    def add_binaries(self, key: str, kernel: str, arch: str, signature: dict, built: dict[str, bytes]) -> CacheEntry | None:
        """Store one kernel's binaries for one architecture ({"cubin"|"ptx"|"json": bytes}) with the
        launch signature they were built for."""
        names = {kind: f"{kernel}.{arch}.{kind}" for kind in built}

        def update(meta: dict) -> None:
            meta.setdefault("binaries", {}).setdefault(kernel, {})[arch] = {"signature": signature, "files": names}

        return self.add_files(key, {names[kind]: data for kind, data in built.items()}, update)

    def add_extra(self, key: str, name: str, data: bytes | dict | list) -> CacheEntry | None:
        """Store a named extra file (JSON for a dict or list), hashed and exported like the others:
        e.g. the GEMM templates' autotune winners as `add_extra(key, "autotune.json", {...})`."""
        if isinstance(data, (dict, list)):
            data = json.dumps(data, indent=1, sort_keys=True).encode()
        file = f"extra.{name}"

        def update(meta: dict) -> None:
            meta.setdefault("extras", {})[name] = file

        return self.add_files(key, {file: data}, update)

    def update_meta(self, key: str, update_meta) -> CacheEntry | None:
        """Change an intact entry's meta.json (no files)."""
        return self.add_files(key, {}, update_meta)

    # -- management (the `flagtree cache` command) ---------------------------------------------

    def entries(self) -> Iterator[tuple[CacheEntry, int]]:
        """Every entry, intact or not, as (entry, size in bytes); an unreadable meta.json reads as {}.

        Only reads: a missing directory has no entries, and nothing is created. Scratch directories of
        writes in progress are skipped, and so is an entry that another process removes meanwhile.
        """
        if not self.directory.is_dir():
            return
        for prefix in sorted(self.directory.iterdir()):
            if len(prefix.name) != 2 or prefix.is_symlink() or not prefix.is_dir():
                continue
            for path in sorted(prefix.iterdir()):
                if not (_KEY.fullmatch(path.name) and path.name.startswith(prefix.name)):
                    continue
                if path.is_symlink() or not path.is_dir():
                    continue
                try:
                    size = sum(item.lstat().st_size for item in path.rglob("*") if not item.is_dir())
                except OSError:
                    continue  # removed while we looked
                try:
                    meta = json.loads((path / META_FILE).read_text())
                except (OSError, ValueError):
                    meta = {}
                yield CacheEntry(path.name, path, meta if isinstance(meta, dict) else {}), size

    def size_bytes(self) -> int:
        return sum(size for _, size in self.entries())

    def remove(self, key: str) -> bool:
        """Remove one entry; False if there was none. The entry is first renamed out of the way, so no
        process ever loads a half-deleted one."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        removed = remove_directory(self.entry_path(key))
        GraphLinks(self.directory).drop(key)  # links that led to it (cache/links.py)
        return removed

    def evict(self, max_bytes: int) -> list[str]:
        """Remove least recently used entries until the cache holds at most `max_bytes`; returns the
        removed keys, oldest use first. Entries whose meta.json cannot be read go first."""
        listed = sorted(self.entries(), key=lambda item: _last_used(item[0].meta))
        total = sum(size for _, size in listed)
        removed = []
        for entry, size in listed:
            if total <= max_bytes:
                break
            if self.remove(entry.key):
                removed.append(entry.key)
            total -= size
        return removed

    def export_bundle(self, file: Path | str, keys: Iterable[str], binaries: Iterable[str] = ()) -> dict[str, str | None]:
        """Write the entries to a .tar.gz bundle (`<key>/meta.json`, `<key>/module.py`), and the content-keyed
        `binaries` (`binaries/<key>/<file>`); returns each key's problem, None for those exported (binaries
        as `binaries/<key>`). An entry that fails its check is left out. The bundle is written to a temporary
        file and renamed into place."""
        file = Path(file)
        problems: dict[str, str | None] = {}
        scratch = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}")
        try:
            with tarfile.open(scratch, "w:gz") as bundle:
                for key in keys:
                    try:
                        meta_bytes, meta, files = self._read_checked(key)
                    except ValueError as problem:
                        problems[key] = str(problem)
                        continue
                    mtime = int(meta.get("created") or time.time())
                    for name, data in [(META_FILE, meta_bytes), *files.items()]:
                        info = tarfile.TarInfo(f"{key}/{name}")
                        info.size, info.mode, info.mtime = len(data), 0o644, mtime
                        bundle.addfile(info, io.BytesIO(data))
                    problems[key] = None
                store = BinaryStore(self.directory)
                for key in binaries:
                    try:
                        files = store.files(key)
                    except ValueError as problem:
                        problems[f"{BINARIES_DIR}/{key}"] = str(problem)
                        continue
                    for name, data in files.items():
                        info = tarfile.TarInfo(f"{BINARIES_DIR}/{key}/{name}")
                        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                        bundle.addfile(info, io.BytesIO(data))
                    problems[f"{BINARIES_DIR}/{key}"] = None
            os.replace(scratch, file)
        finally:
            scratch.unlink(missing_ok=True)
        return problems

    def import_bundle(self, file: Path | str) -> list[tuple[str, str, str | None]]:
        """Add a bundle's entries: (key, "imported" | "kept" | "refused", why) for each.

        Every member is checked before anything is written: an absolute path, `..`, a link or device,
        or anything but `<key>/<file>` refuses the whole bundle (CacheRefused). An entry whose files do
        not match the hashes in its meta.json is refused; an intact entry already here is kept (never
        overwritten); a damaged one is replaced. Each entry is written like `store()`: a temporary
        directory renamed into place. The hashes show the files are the ones exported, not that the
        code is safe to run: import only bundles from people you trust.
        """
        contents = self._read_bundle(Path(file))
        self._check_directory()
        outcomes = []
        binaries = BinaryStore(self.directory)
        for key, files in contents.items():
            if key.startswith(f"{BINARIES_DIR}/"):
                outcome, why = binaries.add_files(key.removeprefix(f"{BINARIES_DIR}/"), files)
                outcomes.append((key, outcome, why))
                continue
            try:
                meta = _checked_bundle_entry(key, files)
            except ValueError as problem:
                outcomes.append((key, "refused", str(problem)))
                continue
            final = self.entry_path(key)
            if final.exists() and self.verify(key) is None:
                outcomes.append((key, "kept", "an intact entry is already in the cache"))
                continue
            now = time.time()
            meta = {**meta, "key": key, "hits": 0, "last_used": now, "imported": now}
            place_directory(final, {**{name: files[name] for name in meta["files"]},
                                    META_FILE: json.dumps(meta, indent=1, default=str)}, replace=True)  # damaged
            problem = self.verify(key)
            outcomes.append((key, "imported", None) if problem is None else (key, "refused", problem))
        return outcomes

    def _read_checked(self, key: str) -> tuple[bytes, dict, dict[str, bytes]]:
        """An entry's meta.json (bytes and parsed) and its files, read once and checked against the
        hashes; ValueError says what is wrong."""
        problem = self.verify(key)  # ownership and a readable meta.json
        if problem is not None:
            raise ValueError(problem)
        path = self.entry_path(key)
        meta_bytes = (path / META_FILE).read_bytes()
        meta = json.loads(meta_bytes)
        files = {name: (path / name).read_bytes() for name in meta["files"]}
        for name, data in files.items():
            if _sha256(data) != meta["files"][name]:
                raise ValueError(f"{name} does not match its hash")
        return meta_bytes, meta, files

    @staticmethod
    def _read_bundle(file: Path) -> dict[str, dict[str, bytes]]:
        """{key: {file name: bytes}} of a bundle whose every member is safe, else CacheRefused."""
        contents: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(file, "r:gz") as bundle:
                members = bundle.getmembers()
                for member in members:
                    parts = member.name.split("/")
                    if member.name.startswith("/") or "\\" in member.name or ".." in parts:
                        raise CacheRefused(f"unsafe path {member.name!r} in the bundle")
                    if parts[0] == BINARIES_DIR:  # binaries/<key>/<file>: cache/binaries.py
                        if len(parts) == 1 and member.isdir():
                            continue
                        parts = [f"{BINARIES_DIR}/{parts[1]}", *parts[2:]] if _KEY.fullmatch(parts[1]) else parts
                    if not (member.isfile() or member.isdir()):
                        raise CacheRefused(f"{member.name!r} in the bundle is a link or special file")
                    if not _KEY.fullmatch(parts[0].removeprefix(f"{BINARIES_DIR}/")) or len(parts) > 2 or (len(parts) == 2) == member.isdir():
                        raise CacheRefused(f"unexpected member {member.name!r} (a bundle holds <key>/<file>)")
                    if member.isfile() and not _FILE_NAME.fullmatch(parts[1]):
                        raise CacheRefused(f"unexpected file name {member.name!r} in the bundle")
                    if member.size > MAX_BUNDLE_FILE_BYTES:
                        raise CacheRefused(f"{member.name!r} in the bundle is too large ({member.size} bytes)")
                    if member.isfile() and parts[1] in contents.get(parts[0], {}):
                        raise CacheRefused(f"{member.name!r} appears twice in the bundle")
                    if member.isfile():
                        contents.setdefault(parts[0], {})[parts[1]] = bundle.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise CacheRefused(f"not a readable .tar.gz bundle: {error}") from None
        return contents

    def _write_json(self, path: Path, data: dict) -> None:
        scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        scratch.write_text(json.dumps(data, indent=1, default=str))
        os.replace(scratch, path)

    def _degrade(self, error: Exception) -> None:
        if not self._warned:
            warnings.warn(f"flagtree: compiled-artifact cache unavailable ({error}); compiling without it", stacklevel=3)
            self._warned = True


def _last_used(meta: dict) -> float:
    value = meta.get("last_used", meta.get("created", 0))
    return value if isinstance(value, (int, float)) else 0


def _checked_bundle_entry(key: str, files: dict[str, bytes]) -> dict:
    """A bundle entry's meta, once its files match their hashes; ValueError says what is wrong."""
    if META_FILE not in files:
        raise ValueError(f"no {META_FILE}")
    try:
        meta = json.loads(files[META_FILE])
        hashes = meta["files"]
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise TypeError("files is not a mapping of names to hashes")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable {META_FILE}: {error}") from None
    if meta.get("key", key) != key:
        raise ValueError(f"{META_FILE} belongs to key {meta['key']}")
    for name in hashes:
        if name == META_FILE or not _FILE_NAME.fullmatch(name):
            raise ValueError(f"{META_FILE} lists a bad file name {name!r}")
        if name not in files:
            raise ValueError(f"{name} is missing")
        if _sha256(files[name]) != hashes[name]:
            raise ValueError(f"{name} does not match its hash")
    unlisted = sorted(set(files) - set(hashes) - {META_FILE})
    if unlisted:
        raise ValueError(f"{', '.join(unlisted)} not listed in {META_FILE}")
    return meta
