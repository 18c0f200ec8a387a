"""`flagtree cache`: look into and manage the compiled-artifact cache (flagtree_py/cache).

    flagtree cache ls                               entries, most recently used first
    flagtree cache show KEY [--kernel NAME] [--source]
    flagtree cache stats
    flagtree cache verify                           check every entry's file hashes
    flagtree cache rm KEY...
    flagtree cache clear [--yes]
    flagtree cache export FILE [KEY...]             a .tar.gz bundle (every entry by default)
    flagtree cache import FILE

The directory is --cache-dir, else FLAGTREE_CACHE_DIR, else the platform's user cache directory: the one
torch.compile(..., backend="flagtree") uses. KEY is a whole key or a unique prefix of 4 or more characters.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from flagtree_py.cli.common import colour_enabled, error, format_age, format_size, format_table, paint

MIN_PREFIX = 4
SHORT_KEY = 12


class BadInput(Exception):
    """A key, kernel or file the user named that is not there: a one-line error, exit status 2."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="look into and manage the compiled-artifact cache",
        description=__doc__.split("\n\n", 2)[2].replace("\n", " "),
        epilog="exit status: 0 success, 1 a damaged entry or a refused bundle, 2 bad input",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="the cache directory (overrides FLAGTREE_CACHE_DIR)")
    parser.set_defaults(prog=parser.prog)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str, run, listing: bool = False, more: str = "") -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}. {more}".strip())
        # also accepted after the action; SUPPRESS leaves the value given before it alone
        sub.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if listing:
            sub.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        sub.set_defaults(run=_guarded(run), prog=sub.prog)
        return sub

    action("ls", "list the entries, most recently used first", _ls, listing=True)
    show = action("show", "one entry: target, hashes, pass counters, partition, kernels, timings", _show,
                  listing=True)
    show.add_argument("key", metavar="KEY", help="a key or a unique prefix of 4 or more characters")
    show.add_argument("--kernel", metavar="NAME", help="print only this kernel's @triton.jit source and launch")
    show.add_argument("--source", action="store_true", help="print the generated module's source")
    action("stats", "entries, size, hits, oldest and newest, entries per target", _stats, listing=True)
    action("verify", "check every entry's files against the hashes in its meta.json (exit 1 on a problem)",
           _verify, listing=True)
    remove = action("rm", "remove entries", _rm)
    remove.add_argument("keys", nargs="+", metavar="KEY", help="keys or unique prefixes")
    clear = action("clear", "remove every entry", _clear)
    clear.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    export = action("export", "write entries to a .tar.gz bundle (every entry by default)", _export)
    export.add_argument("file", metavar="FILE", type=Path, help="the bundle to write, e.g. kernels.tar.gz")
    export.add_argument("keys", nargs="*", metavar="KEY", help="keys or unique prefixes (default: all)")
    import_ = action("import", "add a bundle's entries, each checked against its file hashes", _import,
                     more="The hashes show the files are the ones exported, not that they are safe: a cached "
                     "module is Python that runs on a cache hit, so import only bundles you trust. An intact entry "
                     "already here is kept; a bundle with an absolute path, '..' or a link is refused whole.")
    import_.add_argument("file", metavar="FILE", type=Path, help="a bundle written by `flagtree cache export`")


def cache_directory(args: argparse.Namespace) -> Path:
    """--cache-dir, else FLAGTREE_CACHE_DIR, else the default: as `CompileOptions.from_user` decides."""
    from flagtree_py.cache import default_cache_dir

    return Path(args.cache_dir or os.environ.get("FLAGTREE_CACHE_DIR") or default_cache_dir())


def _guarded(run):
    """The action with the cache opened, its BadInput as a one-line error (exit 2), an unusable cache
    directory or an OS error as a one-line error too, and a closed pipe (`... | head`) quiet."""

    def guarded(args: argparse.Namespace) -> int:
        from flagtree_py.cache import KernelCache
        from flagtree_py.cache.store import CacheRefused

        try:
            return run(args, KernelCache(cache_directory(args)))
        except BadInput as problem:
            return error(args.prog, str(problem))
        except CacheRefused as problem:
            return error(args.prog, f"cache directory refused: {problem}")
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 1
        except OSError as problem:
            print(f"{args.prog}: error: {problem}", file=sys.stderr)
            return 1

    return guarded


# -- looking up ------------------------------------------------------------------------------------


def resolve_keys(listed: list[tuple], texts: list[str], directory: Path) -> list[str]:
    """Whole keys for what the user typed: a whole key or a unique prefix (like git's)."""
    keys = [entry.key for entry, _ in listed]
    resolved = []
    for text in texts:
        prefix = text.lower()
        if not re.fullmatch(r"[0-9a-f]+", prefix):
            raise BadInput(f"{text!r} is not a cache key (keys are hexadecimal)")
        if len(prefix) < MIN_PREFIX:
            raise BadInput(f"key prefix {text!r} is too short: give at least {MIN_PREFIX} characters")
        matches = [key for key in keys if key.startswith(prefix)]
        if not matches:
            raise BadInput(f"no cache entry {text!r} in {directory}")
        if len(matches) > 1:
            raise BadInput(f"key prefix {text!r} is ambiguous: {', '.join(key[:SHORT_KEY] for key in matches)}")
        resolved.append(matches[0])
    return resolved


def _summary(cache, entry, size: int, now: float) -> dict:
    meta = entry.meta
    return {
        "key": entry.key,
        "graph": meta.get("graph"),
        "target": meta.get("target"),
        "target_hash": meta.get("target_hash"),
        "kernels": len(meta.get("kernels", [])),
        "kernel_names": list(meta.get("kernels", [])),
        "size": size,
        "created": meta.get("created"),
        "last_used": meta.get("last_used"),
        "age_s": round(now - meta["created"], 3) if isinstance(meta.get("created"), (int, float)) else None,
        "hits": meta.get("hits", 0),
        "path": str(entry.path),
        "problem": cache.verify(entry.key),
    }


def _when(timestamp) -> str:
    if not isinstance(timestamp, (int, float)):
        return "?"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _ago(timestamp, now: float) -> str:
    return f"{format_age(now - timestamp)} ago" if isinstance(timestamp, (int, float)) else "?"


def _count(number, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _print_json(document) -> None:
    print(json.dumps(document, indent=2, default=str))


def _print_code(source: str) -> None:
    """Python source, highlighted by pygments when it is installed and stdout is a terminal."""
    if colour_enabled():
        try:
            from pygments import highlight
            from pygments.formatters import TerminalFormatter
            from pygments.lexers import PythonLexer
        except ImportError:
            pass
        else:
            source = highlight(source, PythonLexer(), TerminalFormatter())
    sys.stdout.write(source if source.endswith("\n") else source + "\n")


# -- the actions -----------------------------------------------------------------------------------


def _binaries(cache) -> list[dict]:
    """The cache's content-keyed kernel binaries (cache/binaries.py), one row each."""
    from flagtree_py.cache.binaries import BinaryStore

    return [{"key": meta.get("key"), "kernel": meta.get("kernel"), "arch": meta.get("arch"),
             "triton": meta.get("triton"), "meta": (meta.get("signature") or {}).get("meta"), "size": size,
             "problem": problem} for meta, size, problem in BinaryStore(cache.directory).entries()]


def _print_binaries(binaries: list[dict]) -> None:
    if not binaries:
        return
    print("\nbinaries by content (found by kernel source + launch signature + arch + Triton, for any graph entry)")
    print(format_table(["key", "kernel", "arch", "triton", "size", "check"], [
        [row["key"][:SHORT_KEY], row["kernel"], row["arch"], row["triton"], format_size(row["size"]),
         "ok" if row["problem"] is None else "DAMAGED"] for row in binaries]))


def _ls(args: argparse.Namespace, cache) -> int:
    now = time.time()
    rows = [_summary(cache, entry, size, now) for entry, size in list(cache.entries())]
    rows.sort(key=lambda row: row["last_used"] if isinstance(row["last_used"], (int, float)) else 0, reverse=True)
    binaries = _binaries(cache)
    if args.json:
        _print_json({"cache_dir": str(cache.directory), "entries": rows, "binaries": binaries})
        return 0
    if not rows:
        print(f"no entries in {cache.directory}")
        _print_binaries(binaries)
        return 0
    headers = ["key", "graph", "target", "kernels", "size", "age", "used", "hits", "check"]
    table = format_table(headers, [
        [row["key"][:SHORT_KEY], row["graph"] or "?", row["target"] or "?", row["kernels"], format_size(row["size"]),
         format_age(row["age_s"]) if row["age_s"] is not None else "?", _ago(row["last_used"], now), row["hits"],
         "ok" if row["problem"] is None else "DAMAGED"]
        for row in rows
    ]).splitlines()
    colour = colour_enabled()
    print("\n".join(table[:2]))
    for line, row in zip(table[2:], rows):
        print(line if row["problem"] is None else paint(line, "red", colour))
    damaged = sum(row["problem"] is not None for row in rows)
    print(f"\n{_count(len(rows), 'entry', 'entries')}, {format_size(sum(row['size'] for row in rows))} in {cache.directory}"
          + (f"; {damaged} damaged (see `flagtree cache verify`)" if damaged else ""))
    _print_binaries(binaries)
    return 0


def _show(args: argparse.Namespace, cache) -> int:
    listed = list(cache.entries())
    binary = [row for row in _binaries(cache) if row["key"].startswith(args.key.lower())]
    if len(args.key) >= MIN_PREFIX and len(binary) == 1 and not any(e.key.startswith(args.key.lower()) for e, _ in listed):
        from flagtree_py.cache.binaries import BinaryStore

        meta = BinaryStore(cache.directory).meta(binary[0]["key"]) or {}
        document = {**meta, "size": binary[0]["size"], "problem": binary[0]["problem"]}
        if args.json:
            _print_json(document)
        else:
            print("\n".join(f"{name}: {value}" for name, value in document.items()))
        return 0
    (key,) = resolve_keys(listed, [args.key], cache.directory)
    entry, size = next((entry, size) for entry, size in listed if entry.key == key)
    problem = cache.verify(key)
    if args.kernel is not None:
        return _show_kernel(args, entry)
    if args.json:
        document = {**entry.meta, "key": key, "path": str(entry.path), "size": size, "problem": problem}
        if args.source:
            document["source"] = entry.module_source
        _print_json(document)
        return 0
    if args.source:
        _print_code(entry.module_source)
        return 0
    print(describe_entry(entry, size, problem, time.time(), colour_enabled()))
    return 0


def describe_entry(entry, size: int, problem: str | None, now: float, colour: bool = False) -> str:
    """`flagtree cache show KEY`: what an entry is, how it was compiled, and its kernels."""
    meta, record = entry.meta, entry.meta.get("record", {})
    check = paint("ok", "green", colour) if problem is None else paint(f"DAMAGED: {problem}", "red", colour)
    hashed = meta.get("files", {})
    files = ", ".join(f"{name} sha256 {digest[:16]}" for name, digest in list(hashed.items())[:1])
    if len(hashed) > 1:
        files += f" and {len(hashed) - 1} more (binaries and extras below), each hashed"
    lines = [
        ("key", f"{entry.key}  ({check})"),
        ("path", f"{entry.path}  ({format_size(size)})"),
        ("graph", meta.get("graph", "?")),
        ("target", f"{meta.get('target', '?')}  (target hash {meta.get('target_hash', '?')})"),
        ("files", files or "?"),
        *([("versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))] if "versions" in meta else []),
        ("created", f"{_when(meta.get('created'))}  ({_ago(meta.get('created'), now)})"),
        ("last used", (f"{_when(meta.get('last_used'))}  ({_ago(meta.get('last_used'), now)}), "
                       f"{meta.get('hits', 0)} hits")),
        ("compile", f"{record.get('compile_s_cold', '?')} s cold (a hit skips passes and code generation)"),
        ("kernels", (f"{_count(record.get('triton_kernels', len(meta.get('kernels', []))), 'Triton kernel')}; "
                     f"{record.get('work_nodes_in_kernels', '?')} of {record.get('work_nodes', '?')} work nodes "
                     f"in kernels ({_percent(record.get('lowered_fraction'))})")),
        ("views", (f"{record.get('views_folded', '?')} folded into kernel indexing, "
                   f"{record.get('views_in_wrapper', '?')} in the wrapper")),
        ("extern ops", _counts(record.get("extern_ops")) or "none"),
        ("fallbacks", ", ".join(map(str, record.get("codegen_fallbacks", []))) or "none"),
        ("fusions split", ", ".join(record.get("fusions_split", [])) or "none"),
        ("dynamic", ", ".join(record.get("dynamic_symbols", [])) or "none"),
    ]
    width = max(len(label) for label, _ in lines)
    text = [f"{label.ljust(width)}  {value}" for label, value in lines]
    passes = record.get("passes", {})
    if passes:
        text += ["", "passes (what each changed)"]
        text += [f"  {line}" for line in format_table(["pass", "count"], sorted(passes.items(), key=_pass_order(passes))
                                                       ).splitlines()]
    text += ["", "partition"] + [f"  {line}" for line in meta.get("partition", "").rstrip("\n").splitlines()]
    binaries = meta.get("binaries", {})
    if binaries:
        text += ["", "binaries (built ahead of time; a GPU of that architecture launches them with no Triton compile)"]
        rows = [[kernel, arch, ", ".join(f"{kind} {built['files'][kind]}" for kind in sorted(built["files"]))]
                for kernel, per_arch in sorted(binaries.items()) for arch, built in sorted(per_arch.items())]
        text += [f"  {line}" for line in format_table(["kernel", "arch", "files"], rows).splitlines()]
    extras = meta.get("extras", {})
    if extras:
        text += ["", "extra files"] + [f"  {name}: {file}" for name, file in sorted(extras.items())]
    kernels = record.get("kernels", [])
    if kernels:
        text += ["", "kernels (`flagtree cache show KEY --kernel NAME` prints one)"]
        # a kernel shared by groups of the same structure (one per layer) is one row; `launched by` counts them
        rows = [[k.get("name"), k.get("kind"), k.get("group_id"), len(k.get("groups") or [None]),
                 _config(k.get("config")), " ".join(k.get("nodes", []))] for k in kernels]
        text += [f"  {line}" for line in format_table(["name", "kind", "group", "launched by", "launch config", "nodes"],
                                                      rows).splitlines()]
    winners = entry.autotune_winners()
    if winners:
        text += ["", "autotuned GEMM tiles (kernel/M bucket: winner)"]
        text += [f"  {name}: {_config(config)}" for name, config in sorted(winners.items())]
    return "\n".join(text)


def _pass_order(passes: dict):
    order = list(passes)
    return lambda item: order.index(item[0])  # the pipeline's order, as recorded


def _percent(fraction) -> str:
    return f"{fraction:.0%}" if isinstance(fraction, (int, float)) else "?"


def _counts(ops) -> str:
    if isinstance(ops, dict):
        return ", ".join(f"{name} x{count}" for name, count in ops.items())
    return ", ".join(map(str, ops or []))


def _config(config) -> str:
    return " ".join(f"{name}={value}" for name, value in (config or {}).items())


def _show_kernel(args: argparse.Namespace, entry) -> int:
    kernels = {k.get("name"): k for k in entry.meta.get("record", {}).get("kernels", [])}
    for name in entry.meta.get("kernels", []):
        kernels.setdefault(name, {"name": name})
    if args.kernel not in kernels:
        raise BadInput(f"no kernel {args.kernel!r} in entry {entry.key[:SHORT_KEY]}; "
                       f"its kernels: {', '.join(kernels) or 'none'}")
    module = entry.module_source
    source = kernel_source(module, args.kernel)
    if source is None:
        print(f"{args.prog}: error: kernel {args.kernel!r} is not a @triton.jit function in "
              f"{entry.path / 'module.py'}", file=sys.stderr)
        return 1
    kernel = kernels[args.kernel]
    launches = [line.strip() for line in module.splitlines() if re.match(rf"\s+run\({re.escape(args.kernel)},", line)]
    if args.json:
        _print_json({"key": entry.key, "name": args.kernel, "kind": kernel.get("kind"),
                     "group_id": kernel.get("group_id"), "groups": kernel.get("groups"), "config": kernel.get("config"),
                     "nodes": kernel.get("nodes"), "stored": kernel.get("stored"), "launches": launches,
                     "source": source})
        return 0
    print(f"# {args.kernel}: {kernel.get('kind', '?')} kernel of group {kernel.get('group_id', '?')}, "
          f"entry {entry.key[:SHORT_KEY]} ({entry.meta.get('graph', '?')}, {entry.meta.get('target', '?')})")
    print(f"# launch config: {_config(kernel.get('config')) or '?'}")
    if len(kernel.get("groups") or []) > 1:
        print(f"# launched by {len(kernel['groups'])} groups of the same structure: {', '.join(kernel['groups'])}")
    for launch in launches:
        print(f"# launched as: {launch}")
    _print_code(source)
    return 0


def kernel_source(module_source: str, name: str) -> str | None:
    """A decorated top-level function's source, from its first decorator line to its last line (where
    the next top-level definition begins); None when there is no such function."""
    try:
        tree = ast.parse(module_source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name and node.decorator_list:
            first = min(decorator.lineno for decorator in node.decorator_list)
            return "\n".join(module_source.splitlines()[first - 1:node.end_lineno]) + "\n"
    return None


def _stats(args: argparse.Namespace, cache) -> int:
    now = time.time()
    rows = [_summary(cache, entry, size, now) for entry, size in list(cache.entries())]
    dated = sorted((row for row in rows if isinstance(row["created"], (int, float))), key=lambda row: row["created"])

    def point(row):
        return None if row is None else {"key": row["key"], "graph": row["graph"], "created": row["created"]}

    stats = {
        "cache_dir": str(cache.directory),
        "entries": len(rows),
        "bytes": sum(row["size"] for row in rows),
        "hits": sum(row["hits"] for row in rows if isinstance(row["hits"], int)),
        "damaged": sum(row["problem"] is not None for row in rows),
        "oldest": point(dated[0] if dated else None),
        "newest": point(dated[-1] if dated else None),
        "targets": dict(sorted(Counter(row["target"] or "?" for row in rows).items())),
    }
    binaries = _binaries(cache)
    stats["binaries"] = len(binaries)
    stats["binary_bytes"] = sum(row["size"] for row in binaries)
    stats["binaries_per_arch_triton"] = dict(sorted(Counter(f"{row['arch']} triton {row['triton']}"
                                                            for row in binaries).items()))
    if args.json:
        _print_json(stats)
        return 0

    def describe(found) -> str:
        if found is None:
            return "-"
        return f"{found['key'][:SHORT_KEY]} {found['graph']}, created {_when(found['created'])} " \
               f"({_ago(found['created'], now)})"

    lines = [
        ("cache dir", stats["cache_dir"]),
        ("entries", f"{stats['entries']}" + (f" ({stats['damaged']} damaged)" if stats["damaged"] else "")),
        ("size", f"{format_size(stats['bytes'])} ({stats['bytes']} bytes)"),
        ("hits", str(stats["hits"])),
        ("oldest", describe(stats["oldest"])),
        ("newest", describe(stats["newest"])),
        ("targets", ", ".join(f"{target} {count}" for target, count in stats["targets"].items()) or "-"),
        ("binaries", f"{stats['binaries']} ({format_size(stats['binary_bytes'])})" + "".join(
            f", {what} {count}" for what, count in stats["binaries_per_arch_triton"].items())),
    ]
    width = max(len(label) for label, _ in lines)
    print("\n".join(f"{label.ljust(width)}  {value}" for label, value in lines))
    return 0


def _verify(args: argparse.Namespace, cache) -> int:
    listed = list(cache.entries())
    problems = [{"key": entry.key, "problem": problem} for entry, _ in listed
                if (problem := cache.verify(entry.key)) is not None]
    binaries = _binaries(cache)  # content-keyed binaries: never loaded when damaged either
    problems += [{"key": f"binaries/{row['key']}", "problem": row["problem"]} for row in binaries if row["problem"]]
    if args.json:
        _print_json({"cache_dir": str(cache.directory), "checked": len(listed), "problems": problems})
        return 1 if problems else 0
    colour = colour_enabled()
    for found in problems:
        print(paint(f"{found['key']}: {found['problem']}", "red", colour))
    if problems:
        print(f"checked {_count(len(listed), 'entry', 'entries')}: {len(problems)} damaged (never loaded: the next compile of its graph "
              f"rebuilds it; `flagtree cache rm KEY` removes it now)")
        return 1
    also = f" and {_count(len(binaries), 'binary', 'binaries')}" if binaries else ""
    print(f"checked {_count(len(listed), 'entry', 'entries')}{also}: all intact")
    return 0


def _rm(args: argparse.Namespace, cache) -> int:
    listed = list(cache.entries())
    described = {entry.key: entry.meta for entry, _ in listed}
    for key in dict.fromkeys(resolve_keys(listed, args.keys, cache.directory)):
        if cache.remove(key):
            print(f"removed {key} ({described[key].get('graph', '?')}, {described[key].get('target', '?')})")
    return 0


def _clear(args: argparse.Namespace, cache) -> int:
    listed = list(cache.entries())
    if not listed:
        print(f"no entries in {cache.directory}")
        return 0
    what = f"{_count(len(listed), 'entry', 'entries')} ({format_size(sum(size for _, size in listed))}) from {cache.directory}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise BadInput(f"not removing {what} without confirmation (stdin is not a terminal): pass --yes")
        try:
            answer = input(f"remove {what}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    removed = sum(cache.remove(entry.key) for entry, _ in listed)
    print(f"removed {_count(removed, 'entry', 'entries')} from {cache.directory}")
    return 0


def _export(args: argparse.Namespace, cache) -> int:
    listed = list(cache.entries())
    keys = resolve_keys(listed, args.keys, cache.directory) if args.keys else [entry.key for entry, _ in listed]
    if not args.file.parent.is_dir():
        raise BadInput(f"cannot write {args.file}: {args.file.parent} is not a directory")
    # the content-keyed binaries go along whole: which graph will find one is only known where it runs
    problems = cache.export_bundle(args.file, dict.fromkeys(keys), [row["key"] for row in _binaries(cache)])
    skipped = {key: problem for key, problem in problems.items() if problem is not None}
    for key, problem in skipped.items():
        print(f"{args.prog}: skipped {key}: {problem}", file=sys.stderr)
    exported = len(problems) - len(skipped)
    binaries = sum(1 for key, problem in problems.items() if key.startswith("binaries/") and problem is None)
    exported -= binaries
    also = f" and {_count(binaries, 'binary', 'binaries')}" if binaries else ""
    print(f"exported {_count(exported, 'entry', 'entries')}{also} to {args.file} ({format_size(args.file.stat().st_size)})")
    return 1 if skipped else 0


def _import(args: argparse.Namespace, cache) -> int:
    from flagtree_py.cache.store import CacheRefused

    if not args.file.is_file():
        raise BadInput(f"no bundle {args.file}")
    try:
        outcomes = cache.import_bundle(args.file)
    except CacheRefused as problem:
        print(f"{args.prog}: error: refused {args.file}: {problem}; nothing imported", file=sys.stderr)
        return 1
    colour = colour_enabled()
    for key, outcome, why in outcomes:
        if outcome == "refused":
            print(f"{args.prog}: refused {key}: {why}", file=sys.stderr)
        else:
            print(paint(f"{outcome:<8} {key}", "green" if outcome == "imported" else "dim", colour)
                  + (f"  ({why})" if why else ""))
    tally = Counter(outcome for _, outcome, _ in outcomes)
    print(f"{tally['imported']} imported, {tally['kept']} kept, {tally['refused']} refused into {cache.directory}")
    return 1 if tally["refused"] else 0
