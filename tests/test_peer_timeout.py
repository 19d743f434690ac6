"""A frozen rank: a collective timeout, one line from rank 0, every rank exits (issue 11, item 7)."""

import os
import signal
import sys
import time

import pexpect
import psutil
import pytest

from conftest import REPO, interruptible, subprocess_env, torchrun_cmd
from llama import Llama
from llama.chat_repl import PROMPT, check_heartbeat, run_chat


def worker_of_rank(launcher_pid: int, rank: int) -> psutil.Process:
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        if proc.environ().get("RANK") == str(rank) and "chat.py" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no worker of rank {rank}")


def test_a_stopped_rank_is_named_and_every_rank_exits(tiny_ckpt_mp2):
    cmd = torchrun_cmd(
        2, ["chat.py", "--ckpt_dir", tiny_ckpt_mp2, "--collective_timeout_s", 3, "--heartbeat_s", 1]
    )
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(REPO), env=subprocess_env(), encoding="utf-8", timeout=120,
                          preexec_fn=interruptible)
    child.logfile_read = sys.stdout
    stopped = None
    try:
        child.expect_exact(PROMPT)
        stopped = worker_of_rank(child.pid, 1)
        os.kill(stopped.pid, signal.SIGSTOP)
        start = time.monotonic()
        child.sendline("the river")  # rank 0 now waits for rank 1 inside the model's all-reduce
        child.expect_exact("error: rank 1 stopped answering (nothing for 3 s, the collective timeout)", timeout=30)
        assert time.monotonic() - start < 20
        # The link comes back: rank 1 finds rank 0 gone and exits too.
        os.kill(stopped.pid, signal.SIGCONT)
        child.expect(pexpect.EOF, timeout=90)
        output = child.before
    finally:
        if stopped is not None and stopped.is_running():
            os.kill(stopped.pid, signal.SIGCONT)
        child.close(force=True)
    assert child.exitstatus not in (0, None)
    assert "stopped answering" not in output  # one line, not one a rank
    assert output.count("exitcode  : 1") == 2  # torchrun's summary: both ranks exited with status 1


@pytest.mark.parametrize("heartbeat_s", [0, -1, float("nan"), float("inf")])
def test_heartbeat_zero_or_negative_is_refused(tiny_ckpt, heartbeat_s):
    llama = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), 32, 1, device="cpu")
    with pytest.raises(ValueError, match="heartbeat_s must be a finite number of seconds > 0"):
        run_chat(llama, heartbeat_s=heartbeat_s, input_fd=-1)


def test_timeouts_that_cannot_work_are_refused(tiny_ckpt):
    with pytest.raises(ValueError, match=r"heartbeat_s \(60\) must be shorter than collective_timeout_s \(30\)"):
        check_heartbeat(60, 30)
    with pytest.raises(ValueError, match="collective_timeout_s must be a finite number of seconds > 0"):
        Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), 32, 1, device="cpu", collective_timeout_s=0)
