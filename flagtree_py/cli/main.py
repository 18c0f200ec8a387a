"""`flagtree`: the command line (console script `flagtree = flagtree_py.cli.main:main`).

    flagtree serve      vLLM's OpenAI-compatible server for a preset or a checkpoint, compiled by flagtree
    flagtree demo       compile a tiny random-weight model with flagtree, compare greedy tokens with eager
    flagtree compile    compile a model for a target into the cache, no GPU needed (AOT)
    flagtree targets    the registered targets (chips flagtree lowers for) and how they differ
    flagtree validate   compare a model compiled by flagtree with eager PyTorch: logits, top-1, greedy tokens, kernels
    flagtree cache      the compiled-artifact cache: ls, show, stats, verify, rm, clear, export, import
    flagtree --version

Exit status: 0 success, 1 the command ran and found a failure (e.g. compiled tokens differ from eager),
2 bad input (argparse errors and the commands' own one-line errors), 130 interrupted.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from flagtree_py import __version__
from flagtree_py.cli import cache, compile, demo, serve, targets, validate
from flagtree_py.cli.common import installed_version

#: one module per subcommand, in the order `flagtree --help` lists them
COMMANDS = (serve, demo, validate, compile, targets, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flagtree",
        description="flagtree: a torch.compile backend for LLM inference (torch.compile(model, backend=\"flagtree\")).",
        epilog="exit status: 0 success, 1 the command found a failure, 2 bad input",
    )
    parser.add_argument("--version", action="version", version=version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def version_line() -> str:
    """flagtree's version and the toolchain it compiles with (read from package metadata: no torch import)."""
    return (
        f"flagtree {__version__} (torch {installed_version('torch')}, triton {installed_version('triton')}, "
        f"python {platform.python_version()})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first `--` is another program's arguments (`flagtree serve qwen3 -- --max-num-seqs 4`)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    try:
        args = parser.parse_args(argv)
        if passthrough and not getattr(args, "takes_passthrough", False):
            parser.error(f"{args.command} takes no arguments after `--`")
        args.passthrough = passthrough
    except SystemExit as exit_:  # --help and --version exit 0, argparse errors exit 2
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
