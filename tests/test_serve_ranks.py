"""`torchrun --nproc_per_node 2 -m llama.serve` on a two-shard checkpoint: rank 0 serves,
rank 1 follows its steps; SIGTERM ends both cleanly, and a lost rank ends the server
with one line (issue 21)."""

import concurrent.futures
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import REPO, free_port, subprocess_env, torchrun_cmd
from test_serve import request, wait_for_health

openai = pytest.importorskip("openai", reason="the test extra installs openai")
pytest.importorskip("uvicorn", reason="the test extra installs the serve extra's uvicorn")


def start(ckpt, *extra):
    port = free_port()
    cmd = torchrun_cmd(2, ["-m", "llama.serve", "--ckpt_dir", ckpt, "--port", port, "--max_seq_len", 128,
                           "--max_batch_size", 4, "--model_name", "tiny", *extra])
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, 180, lambda: os.killpg(proc.pid, signal.SIGKILL))
    return proc, url


def worker_of_rank(launcher_pid: int, rank: int) -> psutil.Process:
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        if proc.environ().get("RANK") == str(rank) and "llama.serve" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no worker of rank {rank}")


def test_two_ranks_serve_a_batch_and_stop_cleanly(tiny_ckpt_mp2, generator):
    proc, url = start(tiny_ckpt_mp2)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        prompts = ["The llama café", "Hello", "Once upon a time", "Why", "x y z", "Tell me"]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=20,
                                                                         temperature=0), prompts))
        for prompt, reply in zip(prompts, replies):
            # Greedy: the one-shard reference's answer (the ranks' sums differ by rounding only).
            expected = generator.text_completion([prompt], temperature=0, max_gen_len=20)[0]["generation"]
            assert reply.choices[0].text == expected, prompt
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=10, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert request(url + "/health").json()["largest_batch"] >= 2
    finally:
        # Rank 0 stops the engine, which tells rank 1; both end, and so torchrun. (A SIGTERM to
        # torchrun itself reaches both ranks and ends torchrun with its own traceback.)
        os.kill(worker_of_rank(proc.pid, 0).pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in err and "error" not in err.lower(), err[-4000:]


def test_a_lost_rank_ends_the_server_with_one_line(tiny_ckpt_mp2):
    proc, url = start(tiny_ckpt_mp2, "--collective_timeout_s", 4, "--heartbeat_s", 1)
    stopped = None
    try:
        stopped = worker_of_rank(proc.pid, 1)
        os.kill(stopped.pid, signal.SIGSTOP)
        begun = time.monotonic()
        try:  # rank 0 now waits for rank 1 in the step's collectives
            request(url + "/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 5}',
                    {"Content-Type": "application/json"}, timeout=60)
        except OSError:
            pass  # the server ended under the request
        os.kill(stopped.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if stopped is not None and stopped.is_running():
            os.kill(stopped.pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - begun < 60
    assert proc.returncode != 0
    assert err.count("error: rank 1 stopped answering (nothing for 4 s, the collective timeout)") == 1, err[-4000:]
    # torchrun's summary of the failed workers is a traceback of its own; none of ours.
    assert "llama/" not in err, err[-4000:]
