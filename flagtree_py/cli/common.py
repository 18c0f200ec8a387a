"""Helpers shared by the commands: plain-text tables, byte sizes, one-line errors, progress on stderr,
installed versions."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata


def installed_version(distribution: str) -> str:
    """A distribution's version from its metadata (no import), or "not installed"."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in cells)])


def format_bytes(count: int) -> str:
    """227 KiB, 1 GiB, 512 B: exact binary units where the number divides, else bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} B"


def error(prog: str, message: str) -> int:
    """Print a one-line error the way argparse does (`prog: error: message`); returns exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class Progress:
    """Progress lines on stderr, so stdout holds only the result (and `--json` stays parseable).

    On a terminal, steps of one task overwrite each other on one line; in a log, each is its own line.
    """

    def __init__(self, prog: str, stream=None) -> None:
        self.prog = prog
        self.stream = stream if stream is not None else sys.stderr
        self.overwrite = self.stream.isatty()
        self._open_line = False

    def note(self, message: str) -> None:
        self._end_line()
        print(f"{self.prog}: {message}", file=self.stream, flush=True)

    def step(self, task: str, index: int, total: int) -> None:
        text = f"{self.prog}: {task}: token {index}/{total}"
        if self.overwrite:
            print(f"\r{text}", end="", file=self.stream, flush=True)
            self._open_line = index < total
            if not self._open_line:
                print(file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self._open_line:
            print(file=self.stream, flush=True)
            self._open_line = False
