"""Meta's command lines: Meta's scripts are `fire.Fire(main)`, these run `llama.cli.run(main)`.

The same argument lists go through fire (on a stand-in with the signature of each script's
`main`, which records what it is called with) and through `llama.cli.parser_for(main)`:

- where fire reads a command line as meant, `main` gets the same arguments from both
  (compared with ==: fire reads `0` as the int 0, llama.cli as the float its parameter is);
- where the two read it differently on purpose, both values are stated (docs/cli.md);
- a typo, or a value fire misreads and runs `main` with anyway, stops llama.cli in one line
  with status 2 before `main` runs; fire calls `main` first, with the misread value or,
  on a typo, with the defaults, and reports the typo only after `main` returns.
"""

import functools
import inspect
import runpy
from typing import Dict, List, Optional, Tuple

import fire
import pytest

from conftest import REPO
from llama import cli

SCRIPTS = ["example_text_completion.py", "example_chat_completion.py", "example_infilling.py", "chat.py"]


@functools.lru_cache(maxsize=None)
def script_main(script: str):
    """The script's `main`, without running it (the scripts import torch only inside `main`)."""
    return runpy.run_path(str(REPO / script), run_name="fire_probe")["main"]


def through_fire(script: str, argv: List[str]) -> Tuple[Optional[Dict[str, object]], Optional[int]]:
    """(what fire calls `main` with, or None where it does not call it; fire's exit status,
    or None where it finishes)."""
    main = script_main(script)
    calls = []

    @functools.wraps(main)  # fire reads the signature through __wrapped__
    def record(*args, **kwargs):
        bound = inspect.signature(main).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))

    try:
        fire.Fire(record, command=list(argv))
        status = None
    except SystemExit as exit:
        status = exit.code
    return (calls[0] if calls else None), status


def through_llama_cli(script: str, argv: List[str]) -> Dict[str, object]:
    return vars(cli.parser_for(script_main(script), prog=script).parse_args(list(argv)))


def refused_by_llama_cli(script: str, argv: List[str], capsys) -> str:
    """llama.cli's one line for `argv`, which it refuses with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        through_llama_cli(script, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# Read alike, for every script: flags all four scripts have.
SAME_EVERYWHERE = [
    ["llama-2-7b/", "tokenizer.model"],
    ["llama-2-7b/", "tokenizer.model", "--max_seq_len", "128"],  # Meta's README
    ["--ckpt_dir", "llama-2-7b/", "--tokenizer_path", "tokenizer.model"],
    ["--ckpt_dir=llama-2-7b/", "--temperature=0", "--max_seq_len=512"],
    ["--temperature", "0", "--top_p", "1"],  # fire: the ints 0 and 1
    ["--temperature", "-1"],  # a negative number is a value (main refuses it)
    ["--max-seq-len", "64", "--top-p=0.5", "--max_seq-len", "32"],  # - or _; the last one counts
    ["-max_seq_len", "64", "-temperature=0.2"],  # fire's single-dash flags
    ["llama-2-7b/", "--max_seq_len", "64", "tokenizer.model", "--top_p", "0.5"],  # values between flags
    ["--tokenizer_path", "tokenizer.model", "llama-2-7b/"],  # the value is the first parameter no flag names
    ["--quantize", "int4", "--group_size", "64"],
    ["--quantize=int8", "--group_size=None", "--max_gen_len", "None"],  # fire's None
]

# Read alike, for one script.
SAME_IN_ONE = [
    ("example_text_completion.py", ["llama-2-7b/", "tokenizer.model", "0.0", "0.9", "128", "64", "4"]),  # all by place
    ("example_chat_completion.py", ["llama-2-7b-chat/", "tokenizer.model", "--max_seq_len", "512",
                                    "--max_batch_size", "6"]),  # Meta's README
    ("example_infilling.py", ["--suffix_first"]),
    ("example_infilling.py", ["--nosuffix_first"]),
    ("example_infilling.py", ["--suffix-first", "--nosuffix-first", "--top_p", "0.5"]),
    ("example_infilling.py", ["--suffix_first", "--temperature", "0"]),  # alone, before another flag: true
    ("example_infilling.py", ["--suffix_first=True"]),
    ("example_infilling.py", ["--suffix_first", "False"]),
    ("example_infilling.py", ["CodeLlama-7b/", "tokenizer.model", "0", "0.95", "256", "64", "2", "True"]),
    ("chat.py", ["llama-2-7b-chat/", "tokenizer.model", "Answer briefly.", "0.6", "0.9", "2048"]),
    ("chat.py", ["--system", "Answer briefly.", "--seed", "3", "--device", "cpu", "--heartbeat_s", "30"]),
]

CASES_READ_ALIKE = [(script, argv) for script in SCRIPTS for argv in SAME_EVERYWHERE] + SAME_IN_ONE


@pytest.mark.parametrize("script, argv", CASES_READ_ALIKE, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_fire_and_llama_cli_give_main_the_same_arguments(script, argv):
    fire_call, fire_status = through_fire(script, argv)
    assert fire_status is None, f"fire refused {argv}"
    assert through_llama_cli(script, argv) == fire_call


# Read differently on purpose: (script, argv, parameter, fire's value, llama.cli's value).
READ_DIFFERENTLY = [
    # Text stays text: fire reads a value as a Python literal where it can.
    ("chat.py", ["--system", "None"], "system", None, "None"),
    ("chat.py", ["--system", "1e3"], "system", 1000.0, "1e3"),
    ("chat.py", ["--system", "[1, 2]"], "system", [1, 2], "[1, 2]"),
    ("example_text_completion.py", ["--ckpt_dir", "7"], "ckpt_dir", 7, "7"),
    # llama.cli's none for None (fire's None works too, above); fire passes the text.
    ("example_chat_completion.py", ["--max_gen_len", "none"], "max_gen_len", "none", None),
    # fire passes the string "false", which is true, so the prompts would be laid out suffix first.
    ("example_infilling.py", ["--suffix_first", "false"], "suffix_first", "false", False),
]


@pytest.mark.parametrize("script, argv, name, fire_value, our_value", READ_DIFFERENTLY)
def test_documented_differences(script, argv, name, fire_value, our_value):
    fire_call, fire_status = through_fire(script, argv)
    assert fire_status is None
    ours = through_llama_cli(script, argv)
    assert (type(fire_call[name]), fire_call[name]) == (type(fire_value), fire_value)
    assert (type(ours[name]), ours[name]) == (type(our_value), our_value)
    assert {k: v for k, v in ours.items() if k != name} == {k: v for k, v in fire_call.items() if k != name}


TYPO = "typo"  # fire calls main with the defaults, then exits with status 2 naming the flag

# Refused by llama.cli before main runs: (argv, what fire calls main with that it should not).
REFUSED = [
    (["llama-2-7b/", "--temprature", "0"], TYPO),
    (["--max_seq_len=512", "--max-gen-lenn", "64"], TYPO),
    (["--max_seq_len", "1e3"], {"max_seq_len": 1000.0}),  # a float where main wants an int
    (["--max_seq_len", "512.0"], {"max_seq_len": 512.0}),
    (["--temperature"], {"temperature": True}),  # any flag alone is True to fire
    (["--ckpt_dir", "--temperature", "0"], {"ckpt_dir": True, "temperature": 0}),
    (["--notemperature"], {"temperature": False}),  # --noNAME is False for any parameter
    (["--top_p", "high"], {"top_p": "high"}),
    (["--quantize", "int3"], {"quantize": "int3"}),
    # Given twice: fire moves the first value on to the next parameter, the tokenizer.
    (["llama-2-7b/", "--ckpt_dir", "llama-2-13b/"], {"ckpt_dir": "llama-2-13b/", "tokenizer_path": "llama-2-7b/"}),
    # More values than parameters: fire calls main with them all, then stops at the one left over.
    ([f"v{i}" for i in range(14)], TYPO),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv, fire_reads", REFUSED, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_llama_cli_stops_where_fire_would_run_main_wrongly(script, argv, fire_reads, capsys):
    refused_by_llama_cli(script, argv, capsys)
    fire_call, fire_status = through_fire(script, argv)
    assert fire_call is not None, "fire stopped before calling main: no reason for llama.cli to differ"
    if fire_reads is TYPO:
        assert fire_status == 2
    else:
        assert fire_status is None
        for name, value in fire_reads.items():
            assert (type(fire_call[name]), fire_call[name]) == (type(value), value), name


def test_one_letter_flags_are_refused_as_their_meaning_depends_on_the_other_parameters(capsys):
    # fire takes -c for the one parameter starting with c: --ckpt_dir in Meta's scripts and in
    # example_infilling.py; in example_text_completion.py --collective_timeout_s starts with c too.
    assert through_fire("example_infilling.py", ["-c", "CodeLlama-7b/"])[0]["ckpt_dir"] == "CodeLlama-7b/"
    assert through_fire("example_text_completion.py", ["-c", "llama-2-7b/"]) == (None, 2)
    for script in ("example_infilling.py", "example_text_completion.py"):
        err = refused_by_llama_cli(script, ["-c", "llama-2-7b/"], capsys)
        assert "unknown flag -c; flags are written in full: --ckpt_dir" in err


def test_the_scripts_main_run_through_llama_cli_are_the_ones_compared():
    for script in SCRIPTS:
        text = (REPO / script).read_text()
        assert "from llama.cli import run" in text and "    run(main)" in text, script
