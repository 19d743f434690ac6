import json

import pytest
import torch

from conftest import run_torchrun
from llama import Llama
from mp_worker import results


@pytest.fixture(scope="module")
def mp1_results(tiny_ckpt):
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64,
                            max_batch_size=4, seed=5)
    return results(generator)


def test_two_ranks_give_the_single_process_results(tiny_ckpt_mp2, mp1_results, tmp_path):
    out = tmp_path / "mp2.json"
    run_torchrun(2, ["tests/mp_worker.py", tiny_ckpt_mp2, out])
    mp2 = json.loads(out.read_text())
    assert mp2["world_size"] == 2
    assert mp2["greedy"] == mp1_results["greedy"]
    assert mp2["sampled"] == mp1_results["sampled"]
    assert mp2["text"] == mp1_results["text"]
    for got, expected in zip(mp2["logprobs"], mp1_results["logprobs"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


END_PROCESS_WORKER = """
import io, logging, os, sys
import torch
import torch.distributed as dist
from llama.distributed import end_process, init_distributed

init_distributed(torch.device("cpu"))
t = torch.ones(1)
dist.all_reduce(t)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
logging.info("logged by rank %d", dist.get_rank())
# torchrun sets PYTHONUNBUFFERED; a block-buffered stdout, as outside torchrun, shows the flush.
sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(1), "w"), 1 << 16))
if dist.get_rank() == 0:
    print("sum", int(t.item()))  # still in the buffer: end_process must flush it
end_process(0)
print("not reached")
"""


def test_end_process_leaves_a_gloo_job_with_status_0_and_its_output_flushed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(END_PROCESS_WORKER)
    proc = run_torchrun(2, [script], timeout=120)  # fails the test on a non-zero exit
    assert "sum 2" in proc.stdout
    assert "not reached" not in proc.stdout
    assert "logged by rank 0" in proc.stderr and "logged by rank 1" in proc.stderr


def test_the_collective_timeout_uses_torchs_public_setter_where_it_has_one(generator, monkeypatch):
    # torch 2.14 deprecated distributed_c10d._set_pg_timeout with a FutureWarning on every rank;
    # its replacement is dist.set_timeout. Older torch has only the private name.
    import datetime
    import warnings

    import torch.distributed as dist

    from llama.distributed import set_collective_timeout

    calls = []
    monkeypatch.setattr(dist, "set_timeout", lambda timeout, group=None: calls.append(timeout), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_collective_timeout(7)
    assert calls and all(t == datetime.timedelta(seconds=7) for t in calls)
    monkeypatch.delattr(dist, "set_timeout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # with dist.set_timeout taken away, torch 2.14's warns
        set_collective_timeout(None)  # torch before 2.14: the private setter
