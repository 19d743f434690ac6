"""Any shard count on any world size, bf16 and mmap loading, the reshard tool, bad checkpoints.

Every way of loading the same weights must decode exactly as the one-shard
checkpoint on one process: same tokens, logprobs within 1e-5.
"""

import hashlib
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import TINY, _shape, cuda_only, free_port, run_checked, run_torchrun
from llama import Llama, checkpoint
from llama.model import ModelArgs
from llama.reshard import main as reshard_main
from llama.tiny import make_tiny_checkpoint, random_weights, write_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import load_worker  # noqa: E402  (the prompts every run decodes)

WORKER = Path(__file__).with_name("load_worker.py")


def build(ckpt_dir, **kwargs) -> Llama:
    return Llama.build(
        str(ckpt_dir), str(Path(ckpt_dir) / "tokenizer.model"), max_seq_len=64, max_batch_size=2, **kwargs
    )


def assert_same_decoding(got, want):
    assert got["tokens"] == want["tokens"]
    for got_row, want_row in zip(got["logprobs"], want["logprobs"]):
        torch.testing.assert_close(torch.tensor(got_row), torch.tensor(want_row), atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def tiny_ckpt_mp4(tmp_path_factory, tiny_tokenizer) -> Path:
    """`tiny_ckpt`'s weights in four shards: more shards than its two KV heads."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_mp4"), mp=4, tokenizer=tiny_tokenizer, **_shape())


@pytest.fixture(scope="session")
def mqa_ckpt(tmp_path_factory, tiny_tokenizer) -> Path:
    """One KV head for four query heads: any world of 2 or more replicates it."""
    shape = {**_shape(), "n_kv_heads": 1, "seed": 3}
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_mqa"), mp=1, tokenizer=tiny_tokenizer, **shape)


@pytest.fixture(scope="session")
def expected(tiny_ckpt, mqa_ckpt):
    """What the one-shard checkpoints decode to on one process, by checkpoint."""
    return {
        "tiny": load_worker.decode(build(tiny_ckpt)),
        "mqa": load_worker.decode(build(mqa_ckpt)),
    }


def test_more_shards_than_processes(tiny_ckpt_mp2, tiny_ckpt_mp4, expected):
    for ckpt in (tiny_ckpt_mp2, tiny_ckpt_mp4):
        assert_same_decoding(load_worker.decode(build(ckpt)), expected["tiny"])


def read_results(out: Path, world_size: int):
    results = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(world_size)]
    assert [r["world_size"] for r in results] == [world_size] * world_size
    return results


def test_gqa_more_ranks_than_kv_heads(tmp_path, tiny_ckpt_mp2, expected):
    # 4 ranks, 2 KV heads, 2 shards: ranks 0 and 1 share KV head 0 (from
    # shard 0), ranks 2 and 3 KV head 1 (from shard 1).
    out = tmp_path / "four"
    run_torchrun(4, [WORKER, out, tiny_ckpt_mp2])
    for result in read_results(out, 4):
        (record,) = result["records"]
        assert_same_decoding(record, expected["tiny"])
        assert record["opened"] == [f"consolidated.{result['rank'] // 2:02d}.pth"]


def test_two_nodes_any_shard_count(tmp_path, tiny_ckpt, tiny_ckpt_mp2, tiny_ckpt_mp4, mqa_ckpt, expected):
    # Two launchers with c10d rendezvous stand in for two nodes of one
    # process each. One launch, four checkpoints on that world of 2: 2 shards
    # (one each), 1 shard (each rank slices it), 4 shards (each rank joins
    # two), and 1 KV head replicated on both ranks.
    out = tmp_path / "nodes"
    port = free_port()
    failures = []

    def launch(node_rank):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
            str(WORKER), str(out), str(tiny_ckpt_mp2), str(tiny_ckpt), str(tiny_ckpt_mp4), str(mqa_ckpt),
        ]
        try:
            run_checked(cmd, timeout=240)
        except Exception as e:  # re-raised below, in the test's thread
            failures.append(e)

    launchers = [threading.Thread(target=launch, args=(node,)) for node in (0, 1)]
    for t in launchers:
        t.start()
    for t in launchers:
        t.join()
    if failures:
        raise failures[0]
    for result in read_results(out, 2):
        rank = result["rank"]
        assert result["local_rank"] == 0  # one process a node: each picks device LOCAL_RANK 0
        two, one, four, mqa = result["records"]
        for record in (two, one, four):
            assert_same_decoding(record, expected["tiny"])
        assert_same_decoding(mqa, expected["mqa"])
        # Each rank opened only the shards holding its part.
        assert two["opened"] == [f"consolidated.{rank:02d}.pth"]
        assert one["opened"] == ["consolidated.00.pth"]
        assert four["opened"] == [f"consolidated.{2 * rank:02d}.pth", f"consolidated.{2 * rank + 1:02d}.pth"]


def test_bf16_checkpoint_and_rope_freqs(tmp_path, tiny_tokenizer):
    # Meta stores bfloat16; older checkpoints also carry rope.freqs.
    args = ModelArgs(**_shape_args(), vocab_size=TINY["vocab_size"])
    state = {k: v.to(torch.bfloat16) for k, v in random_weights(args, seed=1).items()}
    write_checkpoint(tmp_path / "bf16", state, args, mp=2, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "fp32", {k: v.float() for k, v in state.items()}, args, mp=1)
    shard = torch.load(tmp_path / "bf16" / "consolidated.00.pth", weights_only=True)
    shard["rope.freqs"] = torch.ones(8)
    torch.save(shard, tmp_path / "bf16" / "consolidated.00.pth")
    for name in ("bf16", "fp32"):
        shutil.copyfile(tiny_tokenizer, tmp_path / name / "tokenizer.model")

    # Meta's layout: the bf16 default on CPU repacks the matrices for oneDNN (llama/kernels.py).
    as_bf16 = build(tmp_path / "bf16", dtype=torch.bfloat16, fast_layout=False).model.state_dict()
    assert all(as_bf16[k].dtype == torch.bfloat16 and torch.equal(as_bf16[k], v) for k, v in state.items())
    as_fp32 = build(tmp_path / "bf16", dtype=torch.float32)
    assert all(torch.equal(as_fp32.model.state_dict()[k], v.float()) for k, v in state.items())
    # bf16 on disk loaded as fp32 is exactly the fp32 model of the same values.
    assert_same_decoding(load_worker.decode(as_fp32), load_worker.decode(build(tmp_path / "fp32")))


@cuda_only
def test_bf16_shards_to_fp16_on_cuda(tmp_path, tiny_tokenizer):
    # Meta's bf16 shards, joined and converted tensor by tensor onto the GPU.
    args = ModelArgs(**_shape_args(), vocab_size=TINY["vocab_size"])
    state = {k: v.to(torch.bfloat16) for k, v in random_weights(args, seed=1).items()}
    write_checkpoint(tmp_path, state, args, mp=2, dtype=torch.bfloat16)
    shutil.copyfile(tiny_tokenizer, tmp_path / "tokenizer.model")
    loaded = build(tmp_path, device="cuda", dtype=torch.float16).model.state_dict()
    for key, value in state.items():
        assert loaded[key].device.type == "cuda" and loaded[key].dtype == torch.float16
        assert torch.equal(loaded[key].cpu(), value.to(torch.float16)), key


def _shape_args():
    return {k: v for k, v in TINY.items() if k not in ("vocab_size", "seed")}


def test_matching_dtype_is_assigned_from_the_mapped_file(tiny_ckpt):
    # fp32 on disk, fp32 on CPU, Meta's layout asked for (fast_layout=False;
    # the default copies the matrices into the decoding layout): every weight
    # must live in the memory-mapped shard itself, not in a copy.
    model = build(tiny_ckpt, fast_layout=False).model
    shard = str(tiny_ckpt / "consolidated.00.pth")
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == shard:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))
    assert mapped, "the shard is not memory-mapped"
    for key, param in model.state_dict().items():
        assert any(start <= param.data_ptr() < end for start, end in mapped), f"{key} was copied"


def test_progress_bar_on_request(tiny_ckpt_mp2, capsys):
    args = ModelArgs.from_params(checkpoint.read_params(tiny_ckpt_mp2), vocab_size=TINY["vocab_size"])
    shards = checkpoint.find_shards(tiny_ckpt_mp2)
    checkpoint.load_for_rank(shards, 0, 1, args, progress=True)  # small shards: no bar
    assert "Loading weights" not in capsys.readouterr().err
    checkpoint.load_for_rank(shards, 0, 1, args, progress=True, progress_min_bytes=0)
    assert "Loading weights" in capsys.readouterr().err


def tree_digest(path: Path):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def test_reshard_tool(tmp_path, tiny_ckpt, tiny_ckpt_mp2, expected, capsys):
    before = tree_digest(tiny_ckpt_mp2)
    # 2 -> 4 shards (more than the 2 KV heads: replicated), then 4 -> 1.
    assert reshard_main([str(tiny_ckpt_mp2), str(tmp_path / "mp4"), "--mp", "4"]) == 0
    assert "Resharding to MP=4" in capsys.readouterr().err
    assert reshard_main([str(tmp_path / "mp4"), str(tmp_path / "mp1"), "--mp", "1"]) == 0
    assert tree_digest(tiny_ckpt_mp2) == before  # SRC untouched
    assert sorted(p.name for p in (tmp_path / "mp4").iterdir()) == [
        *(f"consolidated.{r:02d}.pth" for r in range(4)), "params.json", "tokenizer.model"
    ]
    for ckpt in ("mp4", "mp1"):
        assert_same_decoding(load_worker.decode(build(tmp_path / ckpt)), expected["tiny"])
    # MP=1 written back is the original one-shard checkpoint, bit for bit.
    one = torch.load(tmp_path / "mp1" / "consolidated.00.pth", weights_only=True)
    original = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    assert one.keys() == original.keys()
    assert all(torch.equal(one[k], original[k]) for k in original)

    # A non-empty DST is a command-line error (tests/test_tool_command_lines.py), and left as it was.
    with pytest.raises(SystemExit) as exit:
        reshard_main([str(tiny_ckpt_mp2), str(tmp_path / "mp1"), "--mp", "2"])
    assert exit.value.code == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert len(list((tmp_path / "mp1").iterdir())) == 3


def test_reshard_cli_runs_as_a_module(tmp_path, tiny_ckpt):
    # params.json with vocab_size -1, as Meta writes it: the size comes from the embedding.
    src = shutil.copytree(tiny_ckpt, tmp_path / "src")
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    proc = run_checked([sys.executable, "-m", "llama.reshard", str(src), str(tmp_path / "out"), "--mp", "2"])
    assert "wrote 2 shard(s)" in proc.stdout
    shards = [torch.load(path, weights_only=True) for path in sorted((tmp_path / "out").glob("consolidated.*.pth"))]
    assert [shard["tok_embeddings.weight"].shape for shard in shards] == [(TINY["vocab_size"], 32)] * 2


# --- checkpoints that must fail with a clear message ---------------------------------


def test_sizes_that_do_not_fit_name_what_would():
    args = ModelArgs(dim=96, n_layers=1, n_heads=6, multiple_of=48, vocab_size=516)
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot be loaded on a model-parallel size of 2: "
                                         r"one must divide the other; model-parallel sizes that work: 1, 3, 6"):
        checkpoint.load_for_rank([Path("unused.pth")] * 3, 0, 2, args)
    tiny = ModelArgs(**_shape_args(), vocab_size=TINY["vocab_size"])
    with pytest.raises(ValueError, match=r"n_heads = 4 cannot be split over a model-parallel size of 8; "
                                         r"model-parallel sizes that work: 1, 2, 4"):
        checkpoint.check_model_parallel_fit(tiny, 8)
    with pytest.raises(ValueError, match=r"the checkpoint's 8 shard\(s\) do not fit the model in params.json: "
                                         r"n_heads = 4 cannot be split"):
        checkpoint.load_for_rank([Path("unused.pth")] * 8, 0, 1, tiny)
    with pytest.raises(ValueError, match="n_kv_heads = 4 can neither be split over nor replicated"):
        checkpoint.check_model_parallel_fit(ModelArgs(dim=48, n_layers=1, n_heads=6, n_kv_heads=4, vocab_size=6,
                                                      multiple_of=48), 3)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_shard(tmp_path, tiny_ckpt_mp2):
    ckpt = copy_ckpt(tiny_ckpt_mp2, tmp_path / "ckpt")
    shard = ckpt / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match=r"cannot read checkpoint shard .*consolidated\.01\.pth"):
        build(ckpt)


def test_mismatched_shards(tmp_path, tiny_ckpt_mp2, tiny_tokenizer):
    # Shard 1 from a wider model.
    ckpt = copy_ckpt(tiny_ckpt_mp2, tmp_path / "ckpt")
    other = make_tiny_checkpoint(tmp_path / "other", mp=2, tokenizer=tiny_tokenizer, **{**_shape(), "dim": 128})
    shutil.copyfile(other / "consolidated.01.pth", ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"has shape \(512, 64\) in .*consolidated\.01\.pth.*shard 1 of 2.* \(512, 32\)"):
        build(ckpt)
    # Shard 1 from a model with fewer layers.
    other = make_tiny_checkpoint(tmp_path / "short", mp=2, tokenizer=tiny_tokenizer, **{**_shape(), "n_layers": 1})
    shutil.copyfile(other / "consolidated.01.pth", ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth' does not match params.json \(9 missing"):
        build(ckpt)
