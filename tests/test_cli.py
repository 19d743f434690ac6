"""The command lines: flags checked before any work, help, one-line user errors.

Each CLI runs as a subprocess with a bounded timeout; the parser itself is
also tested in-process, where it is fast.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import pytest

from conftest import REPO, subprocess_env, torchrun_cmd
from llama import cli

# Every command line: the scripts, and the modules that run with `python -m`.
# A new one is found here and held to the same rules.
SCRIPTS = sorted(p.name for p in REPO.glob("example_*.py")) + ["chat.py"]
MODULES = sorted(
    f"llama.{p.stem}" for p in (REPO / "llama").glob("*.py")
    if re.search(r'^if __name__ == "__main__":', p.read_text(), re.MULTILINE)
)
TOOLS = [[script] for script in SCRIPTS] + [["-m", module] for module in MODULES]


def test_the_tools_are_found():
    assert {"example_text_completion.py", "example_chat_completion.py", "chat.py"} <= set(SCRIPTS)
    assert {"llama.tiny", "llama.reshard", "llama.convert_hf"} <= set(MODULES)


def run(args, timeout=60, env=None, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=subprocess_env(env), capture_output=True, text=True,
                          timeout=timeout, stdin=stdin)


def shown_lines(proc: subprocess.CompletedProcess):
    """What the user sees, without torch's own launcher warnings."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


# --- the parser, in-process ---


def _main(
    ckpt_dir: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    max_gen_len: Optional[int] = None,
    seed: int = 1,
    compile: bool = False,
    quantize: Optional[Literal["int8", "int4"]] = None,
):
    """Do things.

    Args:
        ckpt_dir: where the weights are; none: a demo
        system: the system prompt
        temperature: 0 is greedy,
            and higher is more random
    """


def parse(*argv):
    return vars(cli.parser_for(_main).parse_args(list(argv)))


@pytest.mark.parametrize("text", ["[INST]", "{name: Bob}", "1e3", "None", "42", "True", "-x y", "  spaced  "])
def test_text_flags_stay_text(text):
    assert parse("--system", text)["system"] == text
    assert parse(f"--system={text}")["system"] == text


def test_typed_flags_and_defaults():
    assert parse() == dict(ckpt_dir=None, system=None, temperature=0.6, max_gen_len=None, seed=1, compile=False,
                           quantize=None)
    got = parse("--temperature", "1e-1", "--max_gen_len", "none", "--seed", "7", "--compile", "--quantize", "int8")
    assert (got["temperature"], got["max_gen_len"], got["seed"], got["compile"], got["quantize"]) == (
        0.1, None, 7, True, "int8")
    assert parse("--max-gen-len", "12", "--compile", "false")["max_gen_len"] == 12
    assert parse("--compile", "false")["compile"] is False


def test_fires_command_lines():
    # Values without a flag are the parameters in order, as for Meta's fire.Fire(main) scripts;
    # tests/test_fire_command_lines.py runs the same command lines through fire itself.
    assert parse("llama-2-7b/", "[INST]", "--seed", "3", "0")["temperature"] == 0.0
    assert parse("llama-2-7b/", "--seed=3")["ckpt_dir"] == "llama-2-7b/"
    assert parse("--system", "s", "llama-2-7b/")["ckpt_dir"] == "llama-2-7b/"  # the flag names the second
    assert parse("--", "-dir-")["ckpt_dir"] == "-dir-"
    assert parse("-seed", "3", "--max-gen_len=4") == parse("--seed", "3", "--max_gen_len", "4")  # fire's spellings
    assert parse("--compile", "--nocompile")["compile"] is False
    assert parse("--compile=True", "--max_gen_len", "None")["compile"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temprature", "0"], "unknown flag --temprature; did you mean --temperature?"),
        (["--max-gen_lenn", "3"], "unknown flag --max-gen_lenn; did you mean --max_gen_len?"),
        (["--temp", "0"], "unknown flag --temp"),  # no abbreviations
        (["-t", "0"], "unknown flag -t; flags are written in full: --temperature"),  # nor fire's one-letter flags
        (["--temperature"], "argument --temperature: expected one argument"),  # fire: True
        (["--notemperature"], "unknown flag --notemperature"),  # fire: False; --noNAME is for a bool
        (["--system", "-x"], "expected one argument (a value that starts with - is written --system=-x)"),
        (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
        (["--max_gen_len", "x"], "expected an integer or none, got 'x'"),
        (["--quantize", "int3"], "expected one of int8, int4 or none, got 'int3'"),
        (["a", "b", "0", "none", "1", "true", "int8", "extra"], "unexpected argument 'extra' (values without a flag"),
        (["dir", "--ckpt_dir", "other"], "ckpt_dir is given twice: as --ckpt_dir and as the value 'dir' in position 1"),
    ],
)
def test_bad_command_lines_fail_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_help_shows_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "0 is greedy, and higher is more random (default: 0.6)" in out
    assert "where the weights are; none: a demo" in out and "(default: none)" in out  # for --system
    assert "--max-gen-len" not in out  # the alias works but is not listed twice


def _raise_on_purpose():
    raise ValueError("temperature must be >= 0")


def _unpack_bug():
    a, b = [1, 2, 3]  # noqa: F841


@pytest.fixture
def as_library(monkeypatch):
    """Count this file as the library's, whose deliberate errors are user errors."""
    monkeypatch.setattr(cli, "_PACKAGE_DIR", REPO / "tests")


def test_user_errors_are_one_line_bugs_keep_their_traceback(capsys, monkeypatch, as_library):
    assert cli.call(_raise_on_purpose) == 1
    assert capsys.readouterr().err == "error: temperature must be >= 0\n"
    with pytest.raises(ValueError, match="too many values to unpack"):
        cli.call(_unpack_bug)

    def missing():
        open(REPO / "no-such-file")

    assert cli.call(missing) == 1
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")
    monkeypatch.setenv("LLAMA_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli.call(_raise_on_purpose)


@pytest.fixture(scope="module")
def nan_embedding_ckpt(tiny_ckpt, tmp_path_factory):
    """`tiny_ckpt` with NaN in every embedding: used in place from the mapped file (fp32, CPU),
    so it loads unchecked, and the first decoding step's logits are not finite."""
    import torch

    out = tmp_path_factory.mktemp("nan_embedding")
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(tiny_ckpt / name, out / name)
    state = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    state["tok_embeddings.weight"].fill_(float("nan"))
    torch.save(state, out / "consolidated.00.pth")
    return out


def test_the_librarys_documented_runtime_errors_are_one_line(nan_embedding_ckpt, tiny_ckpt, tmp_path, capsys):
    # FloatingPointError (logits not finite) and RuntimeError (a mapped shard changed on disk) are
    # raised on purpose and documented (docs/reliability.md): no traceback, as for a ValueError.
    from llama import Llama

    generator = Llama.build(str(nan_embedding_ckpt), None, max_seq_len=32, max_batch_size=1, device="cpu")
    assert cli.call(generator.text_completion, ["the river"], max_gen_len=4) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: decoding step 0 (position ") and "the logits are not finite" in err
    assert err.count("\n") == 1

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    generator = Llama.build(str(ckpt), None, max_seq_len=32, max_batch_size=1, device="cpu", fast_layout=False)
    with open(ckpt / "consolidated.00.pth", "ab") as shard:
        shard.write(b"\0" * 16)  # grown, not truncated: the map's pages stay readable
    assert cli.call(generator.text_completion, ["the river"], max_gen_len=4) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint shard") and "changed on disk" in err and err.count("\n") == 1


def test_runtime_errors_from_elsewhere_keep_their_traceback():
    import torch

    with pytest.raises(RuntimeError):  # a bug, wherever it is: raised inside torch
        cli.call(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))
    with pytest.raises(FloatingPointError):  # not raised by the library
        cli.call(_raise_floating_point_error)


def _raise_floating_point_error():
    raise FloatingPointError("from a script of the user's")


def test_only_rank_0_prints(capsys, monkeypatch, as_library):
    monkeypatch.setenv("RANK", "1")
    assert cli.call(_raise_on_purpose) == 1
    assert capsys.readouterr().err == ""


def test_multi_line_messages_become_one():
    assert cli.one_line("shard x does not match:\n  missing a\n  missing b") == "shard x does not match: missing a; missing b"


# --- every CLI as a subprocess ---


@pytest.mark.parametrize("tool", TOOLS, ids=" ".join)
def test_misspelled_flag_fails_at_once_naming_it(tool, tmp_path):
    # A checkpoint path that fails if anything reads it: had the flag been
    # checked after the work started, the error would be about the path.
    missing = str(tmp_path / "no-checkpoint")
    args = [*tool, "--ckpt_dir", missing] if tool[0] in SCRIPTS else [*tool, missing, str(tmp_path / "dst")]
    start = time.monotonic()
    proc = run([sys.executable, *args, "--max_seq_lenn", "64"])
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert shown_lines(proc) == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown flag --max_seq_lenn")
    assert "no-checkpoint" not in proc.stderr
    assert not (tmp_path / "dst").exists() and not (tmp_path / "no-checkpoint").exists()


def test_chat_dash_h_prints_help():
    proc = run([sys.executable, "chat.py", "-h"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: chat.py")
    assert "--heartbeat_s" in proc.stdout and "(default: 60.0)" in proc.stdout
    assert ">>>" not in proc.stdout  # no chat started


@pytest.mark.parametrize("tool", TOOLS, ids=" ".join)
def test_help_imports_nothing_heavy(tool):
    """--help answers before torch (seconds to import) is loaded; see docs/cli.md for timings."""
    if tool[0] == "-m":
        runner = f"import runpy; runpy.run_module({tool[1]!r}, run_name='__main__', alter_sys=True)"
    else:
        runner = f"import runpy; runpy.run_path({tool[0]!r}, run_name='__main__')"
    probe = (
        "import sys\n"
        f"sys.argv = ['{tool[-1]}', '--help']\n"
        f"try:\n    {runner}\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'fairscale', 'sentencepiece', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = run([sys.executable, "-c", probe], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--help" in proc.stdout
    assert proc.stdout.strip().endswith("HEAVY []")


def _assert_one_line_error(proc, *needles):
    lines = shown_lines(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), lines
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def download_root(tmp_path_factory, tiny_ckpt):
    """Meta's download layout: a folder per model, tokenizer.model beside them."""
    root = tmp_path_factory.mktemp("download")
    for name in ("llama-2-7b", "llama-2-7b-chat"):
        (root / name).mkdir()
        for f in tiny_ckpt.iterdir():
            if f.name != "tokenizer.model":
                (root / name / f.name).symlink_to(f)
    (root / "tokenizer.model").symlink_to(tiny_ckpt / "tokenizer.model")
    return root


USER_ERRORS = {
    # name: (command line, with {tmp}, {tiny}, {hf} and {root} filled in; what the error line must say)
    "missing dir": ("example_text_completion.py --ckpt_dir {tmp}/nope", ["checkpoint directory not found", "nope"]),
    "huggingface dir": ("example_text_completion.py --ckpt_dir {hf}",
                        ["is a HuggingFace checkpoint", "python -m llama.convert_hf to-meta"]),
    "download root": ("example_chat_completion.py --ckpt_dir {root}",
                      ["holds model folders", "llama-2-7b, llama-2-7b-chat"]),
    "bad temperature": ("example_text_completion.py --ckpt_dir {tiny} --temperature -1", ["temperature must be >= 0"]),
    "batch too small": ("example_text_completion.py --ckpt_dir {tiny} --max_batch_size 2",
                        ["max_batch_size must be at least 3"]),
    "prompt too long": ("example_chat_completion.py --ckpt_dir {tiny} --max_seq_len 16",
                        ["longer than max_seq_len 16"]),
    "tags in system prompt": ("chat.py --ckpt_dir {tiny} --system [INST]", ["system prompt holds"]),
    # Before, the chat started and then refused every message as too long.
    "chat max_seq_len too short": ("chat.py --ckpt_dir {tiny} --max_seq_len 4",
                                   ["max_seq_len must be at least", "got 4"]),
    "tokenizer is a directory": ("example_text_completion.py --ckpt_dir {tiny} --tokenizer_path {tiny}",
                                 ["is a directory", "did you mean", "tokenizer.model"]),
    "unknown device": ("chat.py --ckpt_dir {tiny} --device tpu", ["device 'tpu'", "cpu, cuda or cuda:N"]),
    "meta device": ("chat.py --ckpt_dir {tiny} --device meta", ["device 'meta'", "cpu, cuda or cuda:N"]),
    "no cuda": ("chat.py --ckpt_dir {tiny} --device cuda:1", ["device 'cuda:1'", "no CUDA GPU"]),
    "reshard does not fit": ("-m llama.reshard {tiny} {tmp}/mp3 --mp 3",
                             ["cannot be split over a model-parallel size of 3"]),
    # Each of these ended in a traceback (issue 19). A leading NAME=value sets the environment.
    "seed past 64 bits": ("chat.py --ckpt_dir {tiny} --seed 99999999999999999999",
                          ["seed must be an integer from -2**63 to 2**64 - 1", "99999999999999999999"]),
    "collective timeout 0": ("chat.py --ckpt_dir {tiny} --collective_timeout_s 0",
                             ["collective_timeout_s must be a finite number of seconds > 0, got 0"]),
    "WORLD_SIZE not a number": ("WORLD_SIZE=abc example_text_completion.py --ckpt_dir {tiny}",
                                ["environment variable WORLD_SIZE", "'abc'"]),
    "WORLD_SIZE not a number, demo": ("LLAMA_CACHE={tmp}/cache WORLD_SIZE=two example_text_completion.py",
                                      ["environment variable WORLD_SIZE", "'two'"]),
    "RANK not a number": ("RANK=1x example_chat_completion.py --ckpt_dir {tiny}", ["environment variable RANK", "'1x'"]),
    "LOCAL_RANK negative": ("LOCAL_RANK=-1 chat.py --ckpt_dir {tiny}", ["environment variable LOCAL_RANK", "'-1'"]),
}


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory, tiny_ckpt, download_root):
    """Every USER_ERRORS command, run a few at a time (each pays for importing torch)."""
    tmp = tmp_path_factory.mktemp("user-errors")
    hf = tmp / "Llama-2-7b-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    paths = dict(tmp=tmp, tiny=tiny_ckpt, hf=hf, root=download_root)

    def one(name):
        args = [part.format(**paths) for part in USER_ERRORS[name][0].split()]
        env = dict(arg.split("=", 1) for arg in args if re.fullmatch(r"[A-Z_]+=.*", arg))
        return run([sys.executable, *args[len(env):]], timeout=180, env=env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(USER_ERRORS, pool.map(one, USER_ERRORS)))


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_errors_print_one_line(name, user_error_runs):
    _assert_one_line_error(user_error_runs[name], *USER_ERRORS[name][1])


def test_a_bad_collective_timeout_is_named_not_the_heartbeat_derived_from_it(user_error_runs):
    # chat.py blamed --heartbeat_s, which the user had not set, for --collective_timeout_s 0.
    assert "heartbeat" not in shown_lines(user_error_runs["collective timeout 0"])[-1]


def test_non_finite_logits_end_a_script_in_one_line(nan_embedding_ckpt):
    # A FloatingPointError the library raises on purpose (docs/reliability.md): it ended in a traceback.
    proc = run([sys.executable, "example_text_completion.py", "--ckpt_dir", str(nan_embedding_ckpt),
                "--max_gen_len", "2"], timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in shown_lines(proc) if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: decoding step 0 (position "), errors
    assert shown_lines(proc)[-1] == errors[0]


def test_bad_flag_value_fails_before_anything(tmp_path):
    proc = run([sys.executable, "chat.py", "--ckpt_dir", str(tmp_path / "nope"), "--top_p", "high"])
    assert proc.returncode == 2
    assert shown_lines(proc) == ["error: argument --top_p: expected a number, got 'high'"]


def test_checkpoint_that_does_not_fit_the_world_size_fails_before_loading(tiny_ckpt_mp2):
    # As rank 0 of 3 would see it: the check needs no process group, so none is started.
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    proc = run([sys.executable, "example_text_completion.py", "--ckpt_dir", str(tiny_ckpt_mp2)], env=env, timeout=120)
    line = _assert_one_line_error(proc, "model-parallel size of 3", "sizes that work: 1, 2, 4")
    assert "initializing model parallel" not in proc.stdout
    assert line.count("error:") == 1


def test_torchrun_with_a_bad_flag_prints_the_error_once(tmp_path):
    cmd = torchrun_cmd(2, ["chat.py", "--ckpt_dir", str(tmp_path / "nope"), "--temprature", "0"])
    proc = run(cmd, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown flag --temprature; did you mean --temperature? (--help lists the flags)"]


def test_version_matches_setup():
    import llama

    setup_version = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True,
                                   text=True, timeout=60, env={**os.environ}).stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+\.\d+\.\d+", llama.__version__)
    assert setup_version == llama.__version__


def test_bench_without_its_extra_says_what_to_install():
    probe = (
        "import runpy, sys\n"
        "sys.modules['psutil'] = None  # as if not installed\n"
        "sys.argv = ['benchmarks/bench.py', '--shapes', '15M', '--device', 'cpu']\n"
        "runpy.run_path('benchmarks/bench.py', run_name='__main__')\n"
    )
    start = time.monotonic()
    proc = run([sys.executable, "-c", probe], timeout=120)
    assert proc.returncode == 2
    assert 'needs psutil (memory on the CPU): install them with pip install -e ".[bench]"' in proc.stderr
    assert "read bandwidth" not in proc.stdout  # nothing was measured first
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_a_script_is_described_under_args(script):
    # --help shows only what the docstring's Args: section says; a parameter
    # described in a `#` comment instead would show up bare.
    import inspect
    import runpy

    main = runpy.run_path(str(REPO / script), run_name="not_main")["main"]
    _, described = cli._docstring_parts(main.__doc__)
    assert [name for name in inspect.signature(main).parameters if name not in described] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_beside_a_folder_named_llama_says_what_to_do(script, tmp_path):
    # A clone named llama beside the script: Python takes that folder for the
    # package (a namespace package) before the installed one.
    (tmp_path / "llama").mkdir()
    shutil.copy(REPO / script, tmp_path / script)
    env = subprocess_env()
    env["PYTHONPATH"] = ""  # as a user's shell has it: the folder beside the script comes first
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert shown_lines(proc) == [
        f"error: the folder {tmp_path / 'llama'} hides the llama package from this script: "
        "move the script into that folder, or into one with no folder named llama (docs/cli.md)"
    ]


def test_unknown_flag_is_named_before_a_missing_argument_and_per_subcommand(capsys):
    from llama import convert_hf, reshard

    with pytest.raises(SystemExit):
        reshard.main(["--mpp", "2"])  # SRC, DST and --mp are missing too
    assert capsys.readouterr().err == "error: unknown flag --mpp; did you mean --mp? (--help lists the flags)\n"
    with pytest.raises(SystemExit):
        convert_hf.main(["to-hf", "SRC", "DST", "--mp", "2"])  # to-meta's flag
    assert capsys.readouterr().err == "error: flag --mp does not apply to this command (its --help lists the flags)\n"


def _run_without(script, modules, argv=()):
    """Run `script` in a process where `modules` cannot be imported, as before `pip install -e .`."""
    probe = (
        "import runpy, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    sys.modules[name] = None  # as if not installed\n"
        f"sys.argv = [{script!r}, *{list(argv)!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return run([sys.executable, "-c", probe], timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_run_before_installing_says_what_to_install(script):
    proc = _run_without(script, cli.REQUIRED_PACKAGES)
    assert proc.returncode == 1, proc.stderr
    assert shown_lines(proc) == [proc.stderr.strip()]
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "torch" in line and "pip install -e ." in line
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in line
    assert str(REPO) in line  # where to run it


def test_a_missing_requirement_other_than_torch_is_named():
    proc = _run_without("example_text_completion.py", ["sentencepiece"])
    assert proc.returncode == 1, proc.stderr
    assert shown_lines(proc) == [proc.stderr.strip()]
    assert "sentencepiece" in proc.stderr and "pip install -e ." in proc.stderr
    assert "download.pytorch.org" not in proc.stderr  # torch is there


@pytest.mark.parametrize("tool", ["tiny", "reshard", "quantize", "convert_hf"])
def test_a_tool_run_before_installing_says_what_to_install(tool, tmp_path):
    # The -m tools parse their own flags and import torch after; they showed its traceback.
    argv = {"tiny": [str(tmp_path / "out")], "reshard": [str(tmp_path), str(tmp_path / "out"), "--mp", "1"],
            "quantize": [str(tmp_path), str(tmp_path / "out"), "--quantize", "int8"],
            "convert_hf": ["to-hf", str(tmp_path), str(tmp_path / "out")]}[tool]
    probe = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # as if not installed\n"
        f"sys.argv = ['llama.{tool}', *{argv!r}]\n"
        f"runpy.run_module('llama.{tool}', run_name='__main__', alter_sys=True)\n"
    )
    proc = run([sys.executable, "-c", probe], timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert shown_lines(proc) == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: the package torch is not installed") and "pip install -e ." in proc.stderr


def test_the_required_packages_are_requirements_txt():
    names = [re.match(r"[A-Za-z0-9_.-]+", line).group(0)
             for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(cli.REQUIRED_PACKAGES) == sorted(names)


def test_the_examples_take_the_same_model_flags():
    # example_infilling.py had no --quantize or --group_size, which the docs promise every example.
    import inspect
    import runpy

    shared = {"ckpt_dir", "tokenizer_path", "temperature", "top_p", "max_seq_len", "max_gen_len", "max_batch_size",
              "quantize", "group_size"}
    for script in SCRIPTS:
        if script.startswith("example_"):
            main = runpy.run_path(str(REPO / script), run_name="not_main")["main"]
            assert shared - set(inspect.signature(main).parameters) == set(), script
