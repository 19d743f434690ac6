"""The checkpoint tools' command lines (tiny, reshard, quantize, convert_hf): every
argument explained in --help, and a destination in use refused at once, in the
same words and with the same status by all of them."""

import argparse
import importlib
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from llama import atomic, cli

TOOL_MODULES = ["llama.tiny", "llama.reshard", "llama.quantize", "llama.convert_hf"]


class _Parsed(Exception):
    """Raised in place of parsing the command line; carries the parser the tool built."""


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        importlib.import_module(module).main([])
    return caught.value.args[0]


def arguments(parser: argparse.ArgumentParser, command=()):
    """(subcommand path, action) for each argument of `parser` and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # -h, and the hidden --a_b spelling of each --a-b flag
        yield command, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from arguments(sub, command + (name,))


@pytest.mark.parametrize("module", TOOL_MODULES)
def test_every_argument_has_help(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    found = list(arguments(parser))
    assert any(action.option_strings for _, action in found)  # the walk sees the flags
    undescribed = [
        " ".join(command + (action.option_strings[0] if action.option_strings else action.dest,))
        for command, action in found
        if not (action.help or "").strip()
    ]
    assert not undescribed, f"{module}: no help for {undescribed}"


# Each tool run as `python -m`, and whether torch got imported before it exited.
PROBE = """
import runpy, sys
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print("EXIT", code, "TORCH", "torch" in sys.modules)
"""


def command_line(tool: str, src, dst):
    return {
        "tiny": ["llama.tiny", dst],
        "reshard": ["llama.reshard", src, dst, "--mp", "1"],
        "quantize": ["llama.quantize", src, dst, "--quantize", "int8"],
        "to-hf": ["llama.convert_hf", "to-hf", src, dst],
        "to-meta": ["llama.convert_hf", "to-meta", src, dst],
    }[tool]


@pytest.mark.parametrize(
    "tool, dst_is_file",
    [("tiny", False), ("reshard", False), ("quantize", False), ("to-hf", False), ("to-meta", False),
     ("to-meta", True)],
)
def test_a_destination_in_use_is_a_command_line_error_before_torch(tmp_path, tool, dst_is_file):
    src = tmp_path / "src"
    src.mkdir()  # never read: the destination is checked first
    dst = tmp_path / "dst"
    if dst_is_file:
        dst.write_text("the user's")
    else:
        dst.mkdir()
        (dst / "mine.txt").write_text("the user's")
    # The library's own guard (atomic.output_dir) says the same.
    with pytest.raises(FileExistsError) as guard:
        with atomic.output_dir(dst):
            pass
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, command_line(tool, src, dst))],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.splitlines()[-1] == "EXIT 2 TORCH False", proc.stdout + proc.stderr
    assert proc.stderr == f"error: {guard.value}\n"
    assert "exists and is not an empty directory; choose a new one" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    if dst_is_file:
        assert dst.read_text() == "the user's"
    else:
        assert [p.name for p in dst.iterdir()] == ["mine.txt"]
