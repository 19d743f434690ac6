"""The README's runnable blocks, read one way for the tests and for CI.

A fenced block whose opening fence comes right after the line

    <!-- test: run -->

holds commands, one a line: a trailing `\\` joins lines; `#` comment lines
and blank lines are skipped. tests/test_readme.py runs such blocks (less
the `pip install` and `pytest` commands: the suite runs in an installed
checkout); `.ci/run` runs the Quick start block whole, as written, in a new
virtual environment:

    python3 tests/readme_blocks.py --quick-start README.md

prints its lines, one command line each. This file imports only the
standard library: CI runs it before anything is installed.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Tuple

MARKER = "<!-- test: run -->"
QUICK_START = "## Quick start"


def marked_blocks(markdown: str) -> List[Tuple[int, List[str]]]:
    """(line number of the fence, its command lines) for each block marked to run."""
    lines = markdown.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARKER:
            i += 1
            continue
        fence = i + 1
        if fence >= len(lines) or not lines[fence].lstrip().startswith("```"):
            raise ValueError(f"line {i + 1}: {MARKER} must be followed at once by a ``` fence")
        end = fence + 1
        while end < len(lines) and not lines[end].lstrip().startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"line {fence + 1}: the fence is never closed")
        blocks.append((fence + 1, command_lines(lines[fence + 1 : end])))
        i = end + 1
    return blocks


def command_lines(block: List[str]) -> List[str]:
    """The block's lines with `\\` continuations joined, less blank and comment lines."""
    joined, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [line.strip() for line in joined if line.strip() and not line.strip().startswith("#")]


def quick_start(markdown: str) -> List[str]:
    """The command lines of the first marked block in the Quick start section."""
    lines = markdown.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == QUICK_START)
    except StopIteration:
        raise ValueError(f"no {QUICK_START!r} section") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "\n".join(lines[start:end])
    blocks = marked_blocks(section)
    if not blocks or not blocks[0][1]:
        raise ValueError(f"the {QUICK_START!r} section has no block marked {MARKER} with commands in it")
    return blocks[0][1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the command lines of a README's Quick start block.")
    parser.add_argument("readme", help="the README to read")
    parser.add_argument("--quick-start", action="store_true", required=True,
                        help="print the Quick start block's command lines, one a line")
    args = parser.parse_args(argv)
    try:
        commands = quick_start(Path(args.readme).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"error: {args.readme}: {error}", file=sys.stderr)
        return 1
    print("\n".join(commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
