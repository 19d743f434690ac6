"""The README's commands run as written.

Each block of README.md marked `<!-- test: run -->` (tests/readme_blocks.py
reads them) runs here as one bash script with `set -e`, so that a variable
set on one line serves the next, as when a user pastes the block: in a
temporary copy of the checkout, with a time limit, and with LLAMA_CACHE and
HOME pointing into a temporary folder so that nothing of the user's is
touched. `pip install ...` and `python -m pytest ...` are not run (`&&`
splits a line into its commands): the test runs in an installed checkout,
inside the test suite; `.ci/run` runs the Quick start block whole, in a new
virtual environment. Mark only blocks that need no real weights, no network
and no GPU (docs/cli.md).
"""

import os
import shutil
import subprocess
from typing import List

import pytest

from conftest import REPO, subprocess_env
from readme_blocks import MARKER, marked_blocks, quick_start

NOT_RUN = ("pip install", "python -m pytest", "pytest")
BLOCK_TIMEOUT = 600


def commands_to_run(lines: List[str]) -> List[str]:
    """The block's commands, less those that install or run the suite."""
    commands = []
    for line in lines:
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
    assert marked_blocks(text) == [
        (3, ["pip install -e . && python a.py --x 1   # note", "python b.py      --y 2", "python -m pytest -q"])
    ]
    assert commands_to_run(marked_blocks(text)[0][1]) == ["python a.py --x 1   # note", "python b.py      --y 2"]
    with pytest.raises(ValueError, match="must be followed"):
        marked_blocks(MARKER + "\ntext\n```\nx\n```")


def test_the_quick_start_block_is_what_ci_runs():
    text = "\n".join(["# t", "## Install", MARKER, "```", "not this", "```",
                      "## Quick start", "Run:", MARKER, "```", "# cpu only", "pip install a", "b && c", "```",
                      MARKER, "```", "later block", "```", "## Next"])
    assert quick_start(text) == ["pip install a", "b && c"]
    with pytest.raises(ValueError, match="no block marked"):
        quick_start("## Quick start\n```\nunmarked\n```\n")
    # The README's own: the example, then the test suite, each after its install.
    lines = quick_start((REPO / "README.md").read_text())
    assert any(line.startswith("pip install -e . && torchrun") for line in lines), lines
    assert lines[-1] == 'pip install -e ".[test]" && python -m pytest -q', lines


def readme_blocks():
    return [(line, commands_to_run(lines)) for line, lines in marked_blocks((REPO / "README.md").read_text())]


def test_the_readme_marks_commands_to_run():
    assert any(commands for _, commands in readme_blocks()), (
        f"no block of README.md is marked with {MARKER}; mark those that need no weights"
    )


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
    (root / "tmp").mkdir()
    return checkout, root


@pytest.mark.parametrize("line, commands", readme_blocks(), ids=lambda x: str(x)[:60])
def test_readme_block_runs(line, commands, sandbox):
    checkout, root = sandbox
    env = subprocess_env({"LLAMA_CACHE": str(root / "cache"), "HOME": str(root / "home"),
                          "XDG_CACHE_HOME": str(root / "home" / ".cache"), "TMPDIR": str(root / "tmp")})
    # The copy's code, not the checkout's, is what the commands import.
    env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + [p for p in env["PYTHONPATH"].split(os.pathsep)
                                                          if p and p != str(REPO)])
    made_by_install = ("llama.egg-info", "build")  # pip install -e . makes these, as it would in a clone
    before = sorted(path.name for path in checkout.iterdir() if path.name not in made_by_install)
    script = "\n".join(["set -ex", *commands])
    proc = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (
        f"README.md block at line {line} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr (each command after +) ---\n{proc.stderr[-3000:]}"
    )
    # What a block makes goes to a temporary folder, not into the user's checkout.
    after = sorted(path.name for path in checkout.iterdir() if path.name not in made_by_install)
    assert after == before, f"README.md block at line {line} left {sorted(set(after) - set(before))} in the checkout"
