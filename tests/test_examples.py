import sys

import pytest

from conftest import REPO, run_checked, run_torchrun

SEPARATOR = "=================================="


def answers(out: str) -> int:
    """How many generations were printed ("> ..." lines, not fairscale's "> initializing ...")."""
    return sum(1 for line in out.splitlines() if line.startswith("> ") and not line.startswith("> initializing"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private cache folder, so the demo checkpoint is made fresh here."""
    return {"LLAMA_CACHE": str(tmp_path_factory.mktemp("cache"))}


def test_text_example_under_torchrun_with_two_shards(tiny_ckpt_mp2):
    out = run_torchrun(2, ["example_text_completion.py", "--ckpt_dir", tiny_ckpt_mp2, "--max_gen_len", "8"]).stdout
    assert out.count(SEPARATOR) == 3
    assert answers(out) == 3
    assert "The best way to learn a new language is\n> " in out
    assert "Loaded in" in out
    assert "demo checkpoint" not in out


def test_chat_example_with_plain_python_on_the_demo_checkpoint(cache_env):
    out = run_checked([sys.executable, "example_chat_completion.py", "--max_gen_len", "8"], env=cache_env).stdout
    assert "using the demo checkpoint" in out
    assert out.count("> Assistant: ") == 3
    assert "System: Answer in one short sentence.\n\nUser: How does a rainbow form?\n\n> Assistant: " in out
    assert out.count(SEPARATOR) == 3


def test_text_example_under_torchrun_on_the_demo_checkpoint(cache_env):
    out = run_torchrun(1, ["example_text_completion.py", "--max_gen_len", "4", "--temperature", "0"],
                       env=cache_env).stdout
    assert "using the demo checkpoint" in out
    assert answers(out) == 3


def test_text_example_takes_metas_command_line_with_the_paths_by_place(tiny_ckpt, tiny_tokenizer):
    # As Meta's README types it for its fire.Fire(main) script: checkpoint, then tokenizer, without flags.
    out = run_checked([sys.executable, "example_text_completion.py", tiny_ckpt, tiny_tokenizer,
                       "--max_seq_len", "128", "--max_gen_len=4", "--temperature=0"]).stdout
    assert answers(out) == 3
    assert "demo checkpoint" not in out


def test_example_reports_a_missing_checkpoint_clearly(tmp_path):
    proc = None
    try:
        run_checked([sys.executable, "example_text_completion.py", "--ckpt_dir", str(tmp_path / "nope"),
                     "--tokenizer_path", str(tmp_path / "t.model")])
    except AssertionError as err:
        proc = str(err)
    assert proc is not None and "checkpoint directory not found" in proc


class ControlBytesLlama:
    """Stands in for a built Llama whose every generation holds a NUL and an ANSI colour escape."""

    TEXT = "a\x00\x1b[31mred\tb\nc"

    def text_completion(self, prompts, **kwargs):
        return [{"generation": self.TEXT} for _ in prompts]

    def chat_completion(self, dialogs, **kwargs):
        return [{"generation": {"role": "assistant", "content": self.TEXT}} for _ in dialogs]

    def text_infilling(self, prefixes, suffixes, **kwargs):
        return [{"generation": self.TEXT, "full_text": p + self.TEXT + s} for p, s in zip(prefixes, suffixes)]


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py", "example_infilling.py"])
def test_examples_escape_control_characters_as_the_chat_does(script, monkeypatch, capsys):
    import runpy

    from llama import demo, generation

    monkeypatch.setattr(demo, "resolve_checkpoint", lambda ckpt_dir, tokenizer_path, infill=False: ("ckpt", "tok"))
    monkeypatch.setattr(demo, "check_request", lambda *args, **kwargs: None)
    monkeypatch.setattr(generation.Llama, "build", staticmethod(lambda **kwargs: ControlBytesLlama()))
    main = runpy.run_path(str(REPO / script), run_name="not_main")["main"]
    main(ckpt_dir="ckpt")
    out = capsys.readouterr().out
    assert "\x00" not in out and "\x1b" not in out
    assert "a\\x00\\x1b[31mred" in out
    assert "red\tb\nc" in out  # newlines and tabs stay as they are, as in chat.py


def test_loaded_in_counts_what_the_user_waited_for(tiny_ckpt):
    # The number printed used to time only the weights' load (0.02 s on a tiny
    # model) while the first output came seconds after the start.
    import re
    import subprocess
    import time

    from conftest import subprocess_env

    probe = (
        "import runpy, sys, time\n"
        "start = time.time()\n"
        "import torch\n"
        "print('IMPORTING TORCH TOOK', time.time() - start)\n"
        f"sys.argv = ['example_text_completion.py', '--ckpt_dir', {str(tiny_ckpt)!r}, '--max_gen_len', '1']\n"
        "runpy.run_path('example_text_completion.py', run_name='__main__')\n"
    )
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    wall = time.time() - started
    assert proc.returncode == 0, proc.stderr
    importing_torch = float(re.search(r"IMPORTING TORCH TOOK (\S+)", proc.stdout).group(1))
    loaded_in = float(re.search(r"^Loaded in (\S+) seconds$", proc.stdout, re.MULTILINE).group(1))
    assert importing_torch <= loaded_in <= wall


def test_loaded_in_times_the_call_in_a_repl_or_notebook(monkeypatch):
    # There the process may have been open for hours: its age is no wait.
    from llama import generation

    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert generation._LoadClock().wait_began(1234.5) == 1234.5
    monkeypatch.delattr(sys, "ps1")
    monkeypatch.setattr(generation, "_process_age", lambda: 10.0)
    monkeypatch.setattr(generation, "_interactive", lambda: False)  # as in a script:
    assert generation._LoadClock().wait_began(1234.5) == 1224.5  # the first build counts from the process's start
