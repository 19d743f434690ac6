"""Checkpoints and configs that are malformed, huge or changing, and tools that are interrupted.

Each test here failed before the fix it covers (issue 11, items 2-5 and 9).
Children that may block, hang or die of SIGBUS run in subprocesses with timeouts.
"""

import importlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, interruptible, rewrite_shard, subprocess_env
from llama import Llama, checkpoint, convert_hf
from llama.reshard import reshard
from llama.args import ModelArgs


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_params(ckpt: Path, **changes) -> None:
    path = ckpt / "params.json"
    params = json.loads(path.read_text())
    params.update(changes)
    path.write_text(json.dumps(params))


def build(ckpt: Path, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu", **kwargs)


# -- params.json values (items 2 and 9) ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm_eps", 0),
        ("norm_eps", -1e-5),
        ("norm_eps", math.nan),
        ("rope_theta", 0),
        ("rope_theta", -10000.0),
        ("rope_theta", math.inf),
        ("multiple_of", 0),
        ("ffn_dim_multiplier", -1),
        ("ffn_dim_multiplier", math.nan),
    ],
)
def test_bad_params_values_are_refused_naming_file_and_field(tmp_path, tiny_ckpt, field, value):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    edit_params(ckpt, **{field: value})  # json writes NaN and Infinity, and reads them back
    with pytest.raises(ValueError, match=rf"params\.json'?: {field} must be"):
        checkpoint.read_params(ckpt)
    if field in ("norm_eps", "rope_theta"):
        with pytest.raises(ValueError, match=rf"params\.json'?: {field} must be positive and finite"):
            build(ckpt)


def test_deeply_nested_params_json_is_a_value_error(tmp_path, tiny_ckpt):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "params.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"params\.json' is nested too deeply"):
        checkpoint.read_params(ckpt)


# -- shard contents (item 9) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(step=100), r"'step' holds a int, not a tensor"),
        (lambda s: s.update({"norm.weight": s["norm.weight"].to_sparse()}), r"'norm.weight' is a torch.sparse_coo tensor"),
    ],
    ids=["int", "sparse"],
)
def test_shard_values_that_are_not_dense_tensors_are_named(tmp_path, tiny_ckpt, change, message):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    path = rewrite_shard(ckpt, change)
    with pytest.raises(ValueError, match=rf"checkpoint shard '{path}': {message}"):
        build(ckpt)
    with pytest.raises(ValueError, match=message):
        reshard(ckpt, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fifo_shard_is_refused_instead_of_blocking(tmp_path, tiny_ckpt):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "consolidated.00.pth").unlink()
    os.mkfifo(ckpt / "consolidated.00.pth")
    code = (
        "import sys; from llama import Llama\n"
        "try:\n"
        f"    Llama.build({str(ckpt)!r}, {str(ckpt / 'tokenizer.model')!r}, 32, 1, device='cpu')\n"
        "except ValueError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "consolidated.00.pth' is not a regular file" in proc.stdout


def test_reshard_names_a_missing_embedding(tmp_path, tiny_ckpt):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    edit_params(ckpt, vocab_size=-1)  # as Meta's: the row count of tok_embeddings is the vocabulary
    rewrite_shard(ckpt, lambda s: s.pop("tok_embeddings.weight"))
    with pytest.raises(ValueError, match=r"consolidated.00.pth' has no tok_embeddings.weight"):
        reshard(ckpt, tmp_path / "out", 1, progress=False)
    with pytest.raises(ValueError, match=r"no tok_embeddings.weight"):
        convert_hf.meta_to_hf(ckpt, tmp_path / "hf")


# -- HuggingFace inputs (item 9) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_ckpt) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    convert_hf.meta_to_hf(tiny_ckpt, out)
    return out


def edit_config(hf: Path, change) -> None:
    path = hf / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    "case, message",
    [
        ("config_list", r"config.json must hold a JSON object, got list"),
        ("heads_0", r"num_attention_heads must be a positive integer, got 0"),
        ("eps_str", r"rms_norm_eps must be a finite number > 0, got 'x'"),
        ("index_without_weight_map", r"model.safetensors.index.json': weight_map must be an object"),
        ("corrupt_safetensors", r"cannot read '.*model.safetensors' as a .safetensors file"),
    ],
)
def test_malformed_hf_inputs_are_named(tmp_path, hf_dir, case, message):
    hf = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    if case == "config_list":
        edit_config(hf, lambda c: [c])
    elif case == "heads_0":
        edit_config(hf, lambda c: {**c, "num_attention_heads": 0})
    elif case == "eps_str":
        edit_config(hf, lambda c: {**c, "rms_norm_eps": "x"})
    elif case == "index_without_weight_map":
        (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    else:
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match=message):
        convert_hf.hf_to_meta(hf, tmp_path / "out")
    assert convert_hf.main(["to-meta", str(hf), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_to_hf_writes_safetensors_with_the_mode_of_its_other_files(tmp_path, hf_dir):
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in hf_dir.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["tokenizer.model"], modes


# -- a huge layer count (item 4) ----------------------------------------------------------------


def test_a_huge_n_layers_fails_in_well_under_a_second(tmp_path, tiny_ckpt, hf_dir):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    edit_params(ckpt, n_layers=1_000_000)
    args = ModelArgs.from_params(checkpoint.read_params(ckpt))
    calls = [
        lambda: checkpoint.load_for_rank(checkpoint.find_shards(ckpt), 0, 1, args),
        lambda: reshard(ckpt, tmp_path / "resharded", 1, progress=False),
        lambda: convert_hf.meta_to_hf(ckpt, tmp_path / "to_hf"),
    ]
    for call in calls:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"n_layers is 1000000 in the config, but .* holds layers 0 to 1"):
            call()
        assert time.perf_counter() - start < 1.0
    hf = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    edit_config(hf, lambda c: {**c, "num_hidden_layers": 1_000_000})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_hidden_layers is 1000000 in the config"):
        convert_hf.hf_to_meta(hf, tmp_path / "to_meta")
    assert time.perf_counter() - start < 1.0


# -- memory-mapped weights whose file changes (item 3) ------------------------------------------


def run_mmap_worker(ckpt: Path, change: str, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tests/mmap_worker.py", str(ckpt), change, mode],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_mapped_shard_that_changes_is_an_error_not_sigbus(tmp_path, tiny_ckpt, change):
    proc = run_mmap_worker(copy_ckpt(tiny_ckpt, tmp_path / "ckpt"), change, "mmap")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"  # -7 is SIGBUS
    assert "error: checkpoint shard" in proc.stdout and "changed on disk after it was loaded" in proc.stdout
    assert "mmap=False" in proc.stdout


def test_mmap_false_keeps_the_weights_when_the_file_changes(tmp_path, tiny_ckpt):
    proc = run_mmap_worker(copy_ckpt(tiny_ckpt, tmp_path / "ckpt"), "truncate", "copy")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("before", "after")))
    assert lines["before"] == lines["after"]


def test_only_files_still_mapped_are_watched(tiny_ckpt):
    mapped = build(tiny_ckpt, fast_layout=False)
    assert mapped._mapped_files.paths == [str(tiny_ckpt / "consolidated.00.pth")]
    copied = build(tiny_ckpt, fast_layout=False, mmap=False)
    assert copied._mapped_files.paths == []
    prompt = [[1, 5, 6, 7]]
    assert copied.generate(prompt, 8, temperature=0) == mapped.generate(prompt, 8, temperature=0)


# -- interrupted tools (item 5) -----------------------------------------------------------------


def tool_argv(tool: str, tiny_ckpt: Path, hf_dir: Path, dst: Path):
    if tool == "reshard":
        return ["reshard", str(tiny_ckpt), str(dst), "--mp", "2"]
    if tool == "to-meta":
        return ["convert_hf", "to-meta", str(hf_dir), str(dst), "--mp", "2"]
    if tool == "to-hf":
        return ["convert_hf", "to-hf", str(tiny_ckpt), str(dst)]
    return ["tiny", str(dst), "--mp", "2", "--tokenizer", str(tiny_ckpt / "tokenizer.model")]


@pytest.mark.parametrize(
    "tool, signum, dst_exists",
    [
        ("reshard", signal.SIGTERM, True),
        ("to-meta", signal.SIGINT, True),
        ("to-hf", signal.SIGTERM, False),
        ("tiny", signal.SIGINT, False),
    ],
)
def test_an_interrupted_tool_leaves_nothing_and_a_rerun_works(tmp_path, tiny_ckpt, hf_dir, tool, signum, dst_exists):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "mine.txt").write_text("the user's")
    dst = parent / "out"
    if dst_exists:
        dst.mkdir()  # an empty directory the user made for the output stays
    argv = tool_argv(tool, tiny_ckpt, hf_dir, dst)
    child = subprocess.Popen(
        [sys.executable, "tests/slow_save_worker.py", *argv],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible,
    )
    try:
        line = ""
        while line != "saved\n":  # the first file is written; the next waits
            line = child.stdout.readline()
            assert line, f"the tool ended before saving: {child.wait(60)}\n{child.stderr.read()[-3000:]}"
        child.send_signal(signum)
        code = child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert code != 0
    left = sorted(p.name for p in parent.iterdir())
    assert left == (["mine.txt", "out"] if dst_exists else ["mine.txt"])
    if dst_exists:
        assert list(dst.iterdir()) == []
    # A rerun writes the whole output.
    assert importlib.import_module(f"llama.{argv[0]}").main(argv[1:]) == 0
    assert (dst / ("config.json" if tool == "to-hf" else "params.json")).is_file()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_interrupt_tests_work_when_the_suite_runs_with_sigint_ignored():
    # `nohup pytest &` starts the suite with SIGINT ignored; a child that inherits that never
    # sees the test's SIGINT, and the test waited 60 s for it, then failed.
    test = "tests/test_files_reliability.py::test_an_interrupted_tool_leaves_nothing_and_a_rerun_works[tiny-2-False]"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
