"""Helpers shared by the commands: plain-text tables, byte sizes and ages, one-line errors, progress on
stderr, colour on a terminal, installed versions."""

from __future__ import annotations

import argparse
import os
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


def format_size(count: int) -> str:
    """A size for people: 512 B, 4.2 KiB, 13 MiB (three significant digits at most)."""
    value, unit = float(count), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    if unit == "B":
        return f"{count} B"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def format_age(seconds: float) -> str:
    """How long ago, in the largest whole unit: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def colour_enabled(stream=None) -> bool:
    """Colour only for a person at a terminal (and never under NO_COLOR, https://no-color.org)."""
    stream = stream if stream is not None else sys.stdout
    return stream.isatty() and not os.environ.get("NO_COLOR")


_COLOURS = {"red": 31, "green": 32, "yellow": 33, "bold": 1, "dim": 2}


def paint(text: str, colour: str, enabled: bool) -> str:
    """`text` in an ANSI colour when `enabled`, else unchanged."""
    return f"\033[{_COLOURS[colour]}m{text}\033[0m" if enabled else text


def number_argument(convert, accept, expected: str):
    """An argparse `type`: `convert(text)` when `accept` takes the value, else a usage error naming `expected`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = number_argument(int, lambda value: value >= 1, "a positive integer")
fraction = number_argument(float, lambda value: 0.0 <= value <= 1.0, "a fraction between 0 and 1")
non_negative_float = number_argument(float, lambda value: value >= 0.0, "a number >= 0")
