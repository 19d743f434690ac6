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
