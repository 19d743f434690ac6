"""The README's commands run as written.

A fenced block whose opening fence comes right after the line

    <!-- test: run -->

is run here, one command a line (a trailing `\\` joins lines, `&&` splits
one into several, `#` comments and blank lines are skipped), each in bash
with a time limit, in a temporary copy of the checkout, with LLAMA_CACHE and
HOME pointing into a temporary folder so that nothing of the user's is
touched. `pip install ...` and `python -m pytest ...` are not run: the test
runs in an installed checkout, inside the test suite. Mark only blocks that
need no real weights, no network and no GPU (docs/cli.md).
"""

import os
import shutil
import subprocess
from typing import List, Tuple

import pytest

from conftest import REPO, subprocess_env

MARKER = "<!-- test: run -->"
NOT_RUN = ("pip install", "python -m pytest", "pytest")
COMMAND_TIMEOUT = 300


def marked_blocks(markdown: str) -> List[Tuple[int, List[str]]]:
    """(line number of the fence, its commands) for each block marked to run."""
    lines = markdown.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARKER:
            i += 1
            continue
        fence = i + 1
        if fence >= len(lines) or not lines[fence].lstrip().startswith("```"):
            raise ValueError(f"README line {i + 1}: {MARKER} must be followed at once by a ``` fence")
        end = fence + 1
        while end < len(lines) and not lines[end].lstrip().startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"README line {fence + 1}: the fence is never closed")
        blocks.append((fence + 1, commands_of(lines[fence + 1 : end])))
        i = end + 1
    return blocks


def commands_of(block: List[str]) -> List[str]:
    joined, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    commands = []
    for line in joined:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for command in line.split(" && "):
            command = command.strip()
            if not command.startswith(NOT_RUN):
                commands.append(command)
    return commands


def test_marked_blocks_are_parsed():
    text = "\n".join([
        "Intro", MARKER, "```bash", "# a comment", "pip install -e . && python a.py --x 1   # note",
        "python b.py \\", "    --y 2", "", "python -m pytest -q", "```", "```", "python not_marked.py", "```",
    ])
    assert marked_blocks(text) == [(3, ["python a.py --x 1   # note", "python b.py      --y 2"])]
    with pytest.raises(ValueError, match="must be followed"):
        marked_blocks(MARKER + "\ntext\n```\nx\n```")


def readme_commands():
    readme = REPO / "README.md"
    return [(line, command) for line, commands in marked_blocks(readme.read_text()) for command in commands]


def test_the_readme_marks_commands_to_run():
    assert readme_commands(), f"no block of README.md is marked with {MARKER}; mark those that need no weights"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A copy of the checkout to run the README in, and a home of its own."""
    root = tmp_path_factory.mktemp("readme")
    checkout = root / "llama"
    shutil.copytree(
        REPO, checkout,
        ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "gpu-results", ".whl"),
    )
    (root / "home").mkdir()
    return checkout, root


@pytest.mark.parametrize("line, command", readme_commands(), ids=lambda x: str(x)[:60])
def test_readme_command_runs(line, command, sandbox):
    checkout, root = sandbox
    env = subprocess_env({"LLAMA_CACHE": str(root / "cache"), "HOME": str(root / "home"),
                          "XDG_CACHE_HOME": str(root / "home" / ".cache")})
    # The copy's code, not the checkout's, is what the commands import.
    env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + [p for p in env["PYTHONPATH"].split(os.pathsep)
                                                          if p and p != str(REPO)])
    proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (
        f"README.md line {line}: `{command}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
