"""Hostile files and file systems for the tools and the loader (issue 19).

Each test here failed before the fix it covers: non-finite weights written or
quantized, index entries outside the model's folder, output renamed into place
without fsync, shards of the wrong types, a full disk, a symlink destination,
a damaged int4 scale, and a float16 overflow called damage.
"""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama import Llama, atomic, convert_hf, quantization
from llama import quantize as quantize_cli
from llama import reshard as reshard_cli
from llama import tiny as tiny_cli
from llama.reshard import reshard
from conftest import rewrite_shard


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build(ckpt: Path, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu",
                       **kwargs)


def set_value(tensor: torch.Tensor, value: float) -> None:
    tensor.view(-1)[3] = value


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_ckpt) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    convert_hf.meta_to_hf(tiny_ckpt, out)
    return out


def last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


# -- 1. convert_hf to-meta: non-finite weights in every mode ------------------------------------


@pytest.mark.parametrize(
    "mp, dtype, value",
    [(1, None, float("nan")), (1, "bfloat16", float("inf")), (2, None, float("nan")), (2, "bfloat16", float("-inf"))],
)
def test_to_meta_refuses_non_finite_weights_in_every_mode(tmp_path, hf_dir, capsys, mp, dtype, value):
    hf = copy_ckpt(hf_dir, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    set_value(tensors["model.layers.1.mlp.down_proj.weight"], value)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    argv = ["to-meta", str(hf), str(tmp_path / "out"), "--mp", str(mp)] + (["--dtype", dtype] if dtype else [])
    assert convert_hf.main(argv) == 1
    line = last_error_line(capsys)
    assert "model.layers.1.mlp.down_proj.weight" in line and "model.safetensors" in line, line
    assert "infinite value(s)" in line, line
    assert not (tmp_path / "out").exists()


# -- 2. quantize: non-finite source weights ------------------------------------------------------


@pytest.mark.parametrize(
    "mode, key, value",
    [
        ("int8", "layers.0.attention.wq.weight", float("nan")),
        ("int4", "layers.1.feed_forward.w2.weight", float("inf")),
        ("int8", "tok_embeddings.weight", float("nan")),  # not quantized: would be copied as it is
    ],
)
def test_quantize_refuses_non_finite_source_weights(tmp_path, tiny_ckpt, capsys, mode, key, value):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    rewrite_shard(ckpt, lambda s: set_value(s[key], value))
    dst = tmp_path / "q"
    assert quantize_cli.main([str(ckpt), str(dst), "--quantize", mode]) == 1
    line = last_error_line(capsys)
    assert key in line and "consolidated.00.pth" in line and "infinite value(s)" in line, line
    assert not dst.exists()


def test_quantizing_at_load_to_float16_names_an_overflow(tmp_path, tiny_ckpt):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    rewrite_shard(ckpt, lambda s: set_value(s["tok_embeddings.weight"], 69632.0))  # not quantized: converted
    with pytest.raises(ValueError, match=r"tok_embeddings\.weight in .* has values up to 69632 in magnitude, "
                                         r"beyond float16's range \(65504\)"):
        build(ckpt, quantize="int8", dtype=torch.float16)


def test_quantizing_at_load_refuses_a_non_finite_weight(tmp_path, tiny_ckpt):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    rewrite_shard(ckpt, lambda s: set_value(s["layers.0.attention.wq.weight"], float("nan")))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight in '.*consolidated\.00\.pth' holds 1 NaN"):
        build(ckpt, quantize="int8")


# -- 3. index entries outside the folder ---------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "nested_parent"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, hf_dir, where):
    hf = copy_ckpt(hf_dir, tmp_path / "hf")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(hf / "model.safetensors", outside)
    name = {"parent": "../elsewhere.safetensors", "absolute": str(outside),
            "nested_parent": "sub/../../elsewhere.safetensors"}[where]
    keys = list(load_file(outside))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    with pytest.raises(ValueError, match=r"weight_map entry '.+' -> '.*elsewhere\.safetensors' is outside"):
        convert_hf.hf_to_meta(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- 4. fsync before the rename, and of the parent after it -------------------------------------


def record_syncs(monkeypatch):
    """Every fsync (by path) and rename, in order."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


@pytest.mark.parametrize("tool", ["reshard", "quantize", "to-meta", "to-hf", "tiny"])
def test_tool_output_is_synced_before_and_after_the_rename(tmp_path, tiny_ckpt, hf_dir, monkeypatch, tool):
    dst = Path(os.path.realpath(tmp_path)) / "parent" / "out"
    argv = {
        "reshard": (reshard_cli, [str(tiny_ckpt), str(dst), "--mp", "2"]),
        "quantize": (quantize_cli, [str(tiny_ckpt), str(dst), "--quantize", "int8"]),
        "to-meta": (convert_hf, ["to-meta", str(hf_dir), str(dst)]),
        "to-hf": (convert_hf, ["to-hf", str(tiny_ckpt), str(dst)]),
        "tiny": (tiny_cli, [str(dst), "--tokenizer", str(tiny_ckpt / "tokenizer.model")]),
    }
    module, args = argv[tool]
    events = record_syncs(monkeypatch)
    assert module.main(args) == 0
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dst)]
    assert len(renames) == 1, events
    at = renames[0]
    tmp = events[at][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    written = sorted(p.name for p in dst.iterdir())
    assert written and all(f"{tmp}/{name}" in synced_before for name in written), (written, events)
    assert tmp in synced_before, events
    assert ("fsync", str(dst.parent)) in events[at + 1 :], events


def test_the_demo_checkpoint_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CACHE", str(Path(os.path.realpath(tmp_path)) / "cache"))
    events = record_syncs(monkeypatch)
    target = tiny_cli.demo_checkpoint()
    at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target))
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    tmp = events[at][1]
    assert all(f"{tmp}/{p.name}" in synced_before for p in target.iterdir()) and tmp in synced_before, events
    assert ("fsync", str(target.parent)) in events[at + 1 :], events


# -- 5. shards of the wrong types, before family detection --------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"tok_embeddings.weight": 5}), r"'tok_embeddings\.weight' holds a int, not a tensor"),
        (lambda s: s.update({"tok_embeddings.weight": [1.0, 2.0]}), r"'tok_embeddings\.weight' holds a list"),
        (lambda s: s.update({7: torch.zeros(2)}), r"holds a key 7 \(int\), not a weight name"),
    ],
    ids=["int_embedding", "list_embedding", "int_key"],
)
def test_shard_types_are_checked_before_anything_reads_them(tmp_path, tiny_ckpt, change, message):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    path = rewrite_shard(ckpt, change)
    for call in (
        lambda: build(ckpt),
        lambda: reshard(ckpt, tmp_path / "out", 1, progress=False),
        lambda: convert_hf.meta_to_hf(ckpt, tmp_path / "hf"),
    ):
        with pytest.raises(ValueError, match=rf"checkpoint shard '{path}': {message}"):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


# -- 6. a full disk ------------------------------------------------------------------------------

TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


class Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 10 * free, 9 * free, free


def fill_disk(monkeypatch, free=1000):
    """torch.save and safetensors' save_file fail as they do on a full disk, after writing a little."""
    from safetensors import SafetensorError
    import safetensors.torch

    def torch_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK" * 100)
        raise RuntimeError(TORCH_ENOSPC)

    def safetensors_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"{}" * 100)
        raise SafetensorError(SAFETENSORS_ENOSPC)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(free))


def tool_call(tool, tiny_ckpt, hf_dir, dst):
    return {
        "reshard": (reshard_cli, [str(tiny_ckpt), str(dst), "--mp", "2"]),
        "quantize": (quantize_cli, [str(tiny_ckpt), str(dst), "--quantize", "int4"]),
        "to-meta": (convert_hf, ["to-meta", str(hf_dir), str(dst), "--dtype", "bfloat16"]),
        "to-hf": (convert_hf, ["to-hf", str(tiny_ckpt), str(dst)]),
        "tiny": (tiny_cli, [str(dst), "--tokenizer", str(tiny_ckpt / "tokenizer.model")]),
    }[tool]


@pytest.mark.parametrize("tool", ["reshard", "quantize", "to-meta", "to-hf", "tiny"])
def test_a_full_disk_is_named_with_what_was_needed_and_free(tmp_path, tiny_ckpt, hf_dir, monkeypatch, capsys, tool):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "mine.txt").write_text("the user's")
    dst = parent / "out"
    module, argv = tool_call(tool, tiny_ckpt, hf_dir, dst)
    fill_disk(monkeypatch)
    assert module.main(argv) == 1
    line = last_error_line(capsys)
    assert line.startswith(f"error: no space left on device: writing '{dst}' needs "), line
    assert "bytes" in line and "1,000 bytes are free" in line, line
    assert sorted(p.name for p in parent.iterdir()) == ["mine.txt"]


def test_a_torch_write_error_with_room_to_spare_is_not_called_a_full_disk(tmp_path, tiny_ckpt, monkeypatch):
    fill_disk(monkeypatch, free=10**12)
    with pytest.raises(OSError, match=r"could not write .*unexpected pos.*the disk is not full") as caught:
        reshard(tiny_ckpt, tmp_path / "out", 1, progress=False)
    assert caught.value.errno == errno.EIO
    assert not (tmp_path / "out").exists()


def test_a_full_disk_outside_the_tensor_writes_is_named_too(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(5 * 2**20))
    dst = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        with atomic.output_dir(dst) as out:
            (out / "params.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "tokenizer.model"))
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (
        f"no space left on device: writing '{dst}' failed, and 5,242,880 bytes (5.0 MiB) are free on its file "
        "system (with the partial output removed); free some space or choose a destination on another disk"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs, smaller than any tiny checkpoint; skipped where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)
            pytest.fail("a file on the full tmpfs was still open after the tool failed")


@pytest.mark.parametrize("tool", ["reshard", "to-hf", "tiny"])
def test_a_really_full_disk_is_named(tmp_path, tiny_ckpt, hf_dir, small_tmpfs, capsys, tool):
    dst = small_tmpfs / "out"
    module, argv = tool_call(tool, tiny_ckpt, hf_dir, dst)
    assert module.main(argv) == 1
    line = last_error_line(capsys)
    assert line.startswith(f"error: no space left on device: writing '{dst}' needs "), line
    assert "bytes are free" in line, line
    assert list(small_tmpfs.iterdir()) == []


# -- 7. a symlink destination --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["empty_dir", "dangling"])
def test_a_symlink_destination_is_refused_up_front(tmp_path, tiny_ckpt, capsys, target):
    pointed = tmp_path / "real"
    if target == "empty_dir":
        pointed.mkdir()
    link = tmp_path / "link"
    link.symlink_to(pointed)
    problem = atomic.destination_problem(link)
    assert problem.startswith(f"{str(link)!r} is a symbolic link (to {str(pointed)!r})"), problem
    with pytest.raises(SystemExit) as exit_:
        reshard_cli.main([str(tiny_ckpt), str(link), "--mp", "1"])
    assert exit_.value.code == 2 and "is a symbolic link" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        with atomic.output_dir(link):
            raise AssertionError("the block must not run")
    assert link.is_symlink() and os.readlink(link) == str(pointed)
    assert (pointed.is_dir() and list(pointed.iterdir()) == []) if target == "empty_dir" else not pointed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["link", "real"] if target == "empty_dir" else ["link"])


# -- 8. an int4 (or int8) checkpoint with a NaN scale -------------------------------------------


@pytest.mark.parametrize("mode, part", [("int4", "weight_scale"), ("int4", "weight_zero"), ("int8", "weight_scale")])
def test_a_non_finite_scale_is_named_as_damage(tmp_path, tiny_ckpt, mode, part):
    dst = tmp_path / "q"
    quantization.quantize_checkpoint(tiny_ckpt, dst, quantization.make_config(mode), progress=False)
    key = f"layers.1.feed_forward.w1.{part}"
    rewrite_shard(dst, lambda s: set_value(s[key], float("nan")))
    with pytest.raises(ValueError) as caught:
        build(dst)
    message = str(caught.value)
    assert f"{key} in '{dst}/consolidated.00.pth' holds 1 NaN and 0 infinite value(s)" in message, message
    assert "quantize it again from the unquantized checkpoint" in message and "int8'" not in message, message


# -- 9. float16 overflow is not damage -----------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_with_a_large_weight(tmp_path_factory, tiny_ckpt) -> Path:
    ckpt = copy_ckpt(tiny_ckpt, tmp_path_factory.mktemp("big") / "ckpt")

    def change(state):
        for key in state:
            state[key] = state[key].to(torch.bfloat16)
        state["layers.0.feed_forward.w2.weight"].view(-1)[5] = -69632.0  # a bf16 value

    rewrite_shard(ckpt, change)
    return ckpt


def check_overflow_message(message: str) -> None:
    assert "layers.0.feed_forward.w2.weight" in message and "has values up to 69632 in magnitude" in message, message
    assert "beyond float16's range (65504)" in message and "bfloat16 or float32" in message, message
    assert "damaged" not in message and "diverged" not in message, message


def test_a_float16_overflow_is_not_called_damage(tmp_path, bf16_with_a_large_weight, capsys):
    assert reshard_cli.main([str(bf16_with_a_large_weight), str(tmp_path / "out"), "--mp", "1",
                             "--dtype", "float16"]) == 1
    check_overflow_message(last_error_line(capsys))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError) as caught:
        build(bf16_with_a_large_weight, dtype=torch.float16)
    check_overflow_message(str(caught.value))
    # bfloat16 has the range: the same checkpoint loads.
    build(bf16_with_a_large_weight, dtype=torch.bfloat16)


def test_to_meta_to_float16_names_the_overflow(tmp_path, bf16_with_a_large_weight, capsys):
    hf = tmp_path / "hf"
    convert_hf.meta_to_hf(bf16_with_a_large_weight, hf)
    assert convert_hf.main(["to-meta", str(hf), str(tmp_path / "out"), "--dtype", "float16"]) == 1
    line = last_error_line(capsys)
    assert "has values up to 69632 in magnitude" in line and "beyond float16's range (65504)" in line, line
    assert not (tmp_path / "out").exists()
