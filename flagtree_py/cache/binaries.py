"""Kernel binaries by content: `<cache>/binaries/<key>/`, shared by every graph entry and every machine.

A graph entry's key holds the torch, Triton and Python versions (rightly: the graph torch traces and the
module flagtree writes depend on them), so an entry built on one machine never hits on another with a
different torch. A kernel binary depends on much less: the kernel's source, how it is launched, the GPU
architecture and the Triton that built it. That is this store's key:

    sha256(kernel code (decorator and def, comments left out), argument types (pointer dtypes, i32/i64, fp32),
           constexpr meta and num_warps/num_stages, arch ("sm90"), Triton version
           [, for a binary Triton's JIT built: the specialization it chose])

The specialization (runtime/aot.py `jit_specialization`) says which pointers the JIT took as 16-byte aligned,
which integers as multiples of 16 and which as the constant 1: a JIT binary is one build among several of the
same kernel and launch, and only a launch with those properties may use it (and finds it: it computes the same
specialization). Binaries built ahead of time (`flagtree compile`) assume none of it and have no such part.

So a kernel whose source comes out the same under another torch finds its cubin here. Triton's version
is in the key: a cubin and its metadata json are only ever loaded by the Triton that wrote them.

Each binary directory holds `kernel.cubin`, `kernel.ptx`, `kernel.json` (Triton's metadata) and
`binary.json` (key, kernel name, arch, Triton version, the launch signature it was built for, with its
`specialization` for a JIT build, file hashes). Files are hashed and checked before use, written atomically, and travel in the
`flagtree cache export/import` bundles as `binaries/<key>/<file>`.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import textwrap
import time
import tokenize
import uuid
from collections.abc import Iterator
from pathlib import Path

BINARIES_DIR = "binaries"
BINARY_META = "binary.json"
_KEY = re.compile(r"[0-9a-f]{64}")
_KINDS = ("cubin", "ptx", "json")
_I32 = (-(2**31), 2**31)


def kernel_source(fn) -> str:
    """The kernel's code as the key sees it (the raw function or a JITFunction): decorator and def, with
    comments and blank lines left out. Generated kernels carry comments naming graph nodes (`# computes:
    add_3, mul_7`), which another torch may number differently with the same code; a comment changes no
    instruction of the binary (at most the line numbers of its debug info)."""
    fn = getattr(fn, "fn", fn)
    text = textwrap.dedent(inspect.getsource(fn))
    # token strings, with the layout tokens as markers: the same on Python 3.11 and 3.12 (whose tokenizers
    # differ in positions and in f-strings, which Triton kernels do not use)
    markers = {tokenize.NEWLINE: "<newline>", tokenize.INDENT: "<indent>", tokenize.DEDENT: "<dedent>"}
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER)
    tokens = [markers.get(kind, value) for kind, value, *_ in
              tokenize.generate_tokens(io.StringIO(text).readline) if kind not in skipped]
    # the kernel's own name is its group's number in the graph (k7_mm_partial), which shifts when another
    # torch decomposes an earlier op differently; a binary carries its name in its own metadata
    for i in range(len(tokens) - 1):
        if tokens[i] == "def":
            tokens[i + 1] = "<kernel>"
            break
    return " ".join(tokens)


def binary_key(source: str, signature: dict, arch: str, triton_version: str,
               specialization: tuple[str, ...] | list[str] | None = None) -> str:
    """The content key of a kernel built from `source` for launches of `signature` on `arch`.

    Integer arguments enter as their width (an ahead-of-time build compiles them as i32 or i64), floats as
    fp32, pointers as their dtype; `specialization`, for a binary built by Triton's JIT, is what it assumed
    of each argument (alignment, multiples of 16, constant 1s).
    """
    arguments = []
    for kind, value in signature["arguments"]:
        if kind == "pointer":
            arguments.append(value)
        elif kind == "int":
            arguments.append("i32" if _I32[0] <= value < _I32[1] else "i64")
        else:
            arguments.append("fp32")
    meta = dict(signature.get("meta", {}))
    meta.setdefault("num_warps", 4)  # Triton's defaults, as compile_for_nvidia applies them
    meta.setdefault("num_stages", 3)
    canonical = {"source": source, "arguments": arguments, "meta": sorted(meta.items()), "arch": arch,
                 "triton": triton_version}
    if specialization is not None:  # absent for ahead-of-time builds: their keys stay what they were
        canonical["specialization"] = list(specialization)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def remove_directory(path: Path) -> bool:
    """Remove a cache entry's or a binary's directory; False if there was none. It is first renamed out
    of the way, so no process ever reads a half-deleted one."""
    doomed = path.with_name(f".tmp-rm-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def place_directory(final: Path, files: dict[str, bytes | str], replace: bool) -> None:
    """Write `files` into a scratch directory beside `final`, then rename it into place: a reader sees the
    whole directory or none. `replace`: what is at `final` (a damaged one) is removed first; otherwise, or
    when another process placed one meanwhile, theirs is kept and ours discarded."""
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{uuid.uuid4().hex[:8]}-", dir=final.parent))
    try:
        for name, data in files.items():
            (scratch / name).write_bytes(data.encode() if isinstance(data, str) else data)
    except OSError:  # a full disk: no half-written scratch directory is left behind
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if replace and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(scratch, final)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


class BinaryStore:
    """The content-addressed binaries of one cache directory."""

    def __init__(self, cache_dir: Path | str) -> None:
        self.directory = Path(cache_dir) / BINARIES_DIR

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a binary key: {key!r}")
        return self.directory / key

    def put(self, key: str, kernel: str, arch: str, triton_version: str, signature: dict,
            files: dict[str, bytes], source: str | None = None) -> Path | None:
        """Store one build ({"cubin"|"ptx"|"json": bytes}); an intact binary already there is kept.
        `source`, the kernel's text, is kept for `cache show` and for explaining a lookup that missed.
        None when the store cannot be written (full disk, read-only directory): nothing is stored."""
        final = self.path(key)
        present = final.exists()
        if present and self.verify(key) is None:
            return final
        names = {kind: f"kernel.{kind}" for kind in files if kind in _KINDS}
        meta = {"key": key, "kernel": kernel, "arch": arch, "triton": triton_version, "signature": signature,
                "files": {name: hashlib.sha256(files[kind]).hexdigest() for kind, name in names.items()},
                "kinds": names, "created": time.time(), "source": source}
        try:
            # one present is damaged (it failed its check): replaced; one another process placed meanwhile: kept
            place_directory(final, {**{name: files[kind] for kind, name in names.items()},
                                    BINARY_META: json.dumps(meta, indent=1)}, replace=present)
        except OSError:
            return None
        return final if final.is_dir() else None

    def meta(self, key: str) -> dict | None:
        try:
            return json.loads((self.path(key) / BINARY_META).read_text())
        except (OSError, ValueError):
            return None

    def verify(self, key: str) -> str | None:
        """None when the binary's files match their hashes and its meta names this key, else what is wrong."""
        meta = self.meta(key)
        if meta is None:
            return "missing or unreadable binary.json"
        if meta.get("key") != key:
            return f"binary.json belongs to {meta.get('key')}"
        try:
            for name, digest in meta["files"].items():
                if hashlib.sha256((self.path(key) / name).read_bytes()).hexdigest() != digest:
                    return f"{name} does not match its hash"
        except (OSError, KeyError) as error:
            return f"unreadable: {error}"
        return None

    def get(self, key: str) -> tuple[dict, dict[str, Path]] | None:
        """(the launch signature it was built for, {"cubin"|"ptx"|"json": path}) of an intact binary, else None."""
        if not _KEY.fullmatch(key) or self.verify(key) is not None:
            return None
        meta = self.meta(key)
        signature = {**meta["signature"], "arguments": [tuple(a) for a in meta["signature"]["arguments"]]}
        return signature, {kind: self.path(key) / name for kind, name in meta["kinds"].items()}

    def entries(self) -> Iterator[tuple[dict, int, str | None]]:
        """Every binary as (meta, size in bytes, problem or None); reads only."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.iterdir()):
            if not _KEY.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
                continue
            try:
                size = sum(item.lstat().st_size for item in path.iterdir())
            except OSError:
                continue
            yield self.meta(path.name) or {"key": path.name}, size, self.verify(path.name)

    def remove(self, key: str) -> bool:
        return remove_directory(self.path(key))

    def files(self, key: str) -> dict[str, bytes]:
        """All files of an intact binary (for a bundle), binary.json included; ValueError if damaged."""
        problem = self.verify(key)
        if problem is not None:
            raise ValueError(problem)
        meta = self.meta(key)
        return {BINARY_META: (self.path(key) / BINARY_META).read_bytes(),
                **{name: (self.path(key) / name).read_bytes() for name in meta["files"]}}

    def add_files(self, key: str, files: dict[str, bytes]) -> tuple[str, str | None]:
        """Add a bundle's binary: ("imported" | "kept" | "refused", why). Checked before anything is written."""
        try:
            meta = json.loads(files[BINARY_META])
            hashes = meta["files"]
            if meta.get("key") != key:
                raise ValueError(f"binary.json belongs to {meta.get('key')}")
            for name, digest in hashes.items():
                if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
                    raise ValueError(f"{name} is missing or does not match its hash")
            if set(files) - set(hashes) - {BINARY_META}:
                raise ValueError("files not listed in binary.json")
            if not set(meta["kinds"].values()) <= set(hashes):
                raise ValueError("binary.json names files it does not hash")
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            return "refused", str(error)
        final = self.path(key)
        if final.exists() and self.verify(key) is None:
            return "kept", "an intact binary is already in the cache"
        place_directory(final, files, replace=True)  # damaged: replaced
        problem = self.verify(key)
        return ("imported", None) if problem is None else ("refused", problem)
