"""Load on `python -m llama.serve`: concurrent streaming clients against one request at a time.

    python benchmarks/serve_load.py                            # 100M shape, 16 clients, 48 requests
    python benchmarks/serve_load.py --clients 8 --requests 24 --max-tokens 32 --json load.json

It writes bench.py's 100M shape with seeded random fp32 weights (seed 0) as a
Meta checkpoint in a temporary folder, starts the server on 127.0.0.1 (a free
port, max_batch_size = --clients) and sends one fixed, seeded list of streamed
/v1/completions requests, each with its own seed, twice:

- one at a time: one client, each request sent when the last has ended;
- concurrent: --clients threads, each taking the next request of the list
  until it is empty or --duration has passed. The clients arrive over time,
  their starts spread over one lone request's duration, as users do, rather
  than all at one step.

Prompt lengths are uniform in [--prompt-tokens/2, --prompt-tokens] and
max_tokens in [--max-tokens/2, --max-tokens], so that replies do not all end
at the same step. Everything is timed at the client, as a user sees it:
time to first token (request sent to first text chunk) and the gaps between
successive chunks of one stream (one chunk per token, except where a token
ends no character yet and its text comes with the next). Generated tokens are
the server's usage counts. A response counts as an error unless it is HTTP
200, ends with a finish_reason and `data: [DONE]`, and its token count fits
its finish_reason ("length": max_tokens; "stop": fewer, the random model drew
EOS). Exit status 1 if any response is an error or the server does not exit
0 on SIGTERM; a missed target is only reported. Started under a real-time
policy (`chrt -f`), it runs itself and the server at the normal one, as a
server is run (`normal_policy`).
"""

import argparse
import http.client
import importlib.util
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # llama, and bench.py beside this file

from bench import LLAMA2_TOKENIZER, SHAPES  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.tiny import random_weights, train_tokenizer, write_checkpoint  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

MODEL = "100M"
WORDS = ("the a of to and in is was that for on with as by at from it an be this which or are have not one "
         "river mountain llama garden window morning village story music letter engine market summer winter "
         "light water stone paper friend teacher doctor city road bridge forest ocean cloud animal kitchen "
         "walked found opened carried wrote remembered listened painted built crossed answered watched").split()


def cpu_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    flags = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    policy = f"{policy_name(os.sched_getscheduler(0))}, nice {os.nice(0)}"
    return (f"CPU: {model}, {os.cpu_count()} logical CPUs; avx2 {'yes' if 'avx2' in flags else 'no'}; "
            f"avx512: {' '.join(avx512) or 'none'}; torch {torch.__version__}; this process at {policy}; "
            f"load average {os.getloadavg()[0]:.2f}")


def make_checkpoint(folder: Path) -> Tokenizer:
    """The 100M shape, fp32, seed 0, with Meta's Llama 2 tokenizer where present (else a small trained
    one, and the vocabulary shrinks to its size: the server must decode every id the model can draw)."""
    tokenizer_path = folder / "tokenizer.model"
    if LLAMA2_TOKENIZER.is_file():
        tokenizer_path.write_bytes(LLAMA2_TOKENIZER.read_bytes())
    else:
        train_tokenizer(tokenizer_path, vocab_size=1741)
        print(f"no Llama 2 tokenizer at {LLAMA2_TOKENIZER}: a trained one, vocabulary 1741 instead of 32000")
    tokenizer = Tokenizer(str(tokenizer_path))
    args = ModelArgs(**{**SHAPES["100M"], "vocab_size": tokenizer.n_words})
    write_checkpoint(folder, random_weights(args, seed=0), args)
    return tokenizer


def make_requests(tokenizer: Tokenizer, opts) -> list:
    """The fixed request list: prompts of words until the wanted token count, seeded lengths and seeds."""
    rng = random.Random(opts.seed)
    requests = []
    for i in range(opts.requests):
        want = rng.randint(max(1, opts.prompt_tokens // 2), opts.prompt_tokens)
        words = []
        while len(tokenizer.encode(" ".join(words), bos=True, eos=False)) < want:
            words.append(rng.choice(WORDS))
        body = {"model": MODEL, "prompt": " ".join(words), "stream": True, "seed": opts.seed * 1000 + i,
                "max_tokens": rng.randint(max(1, opts.max_tokens // 2), opts.max_tokens),
                "stream_options": {"include_usage": True}}
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
        requests.append(body)
    return requests


def stream_completion(port: int, body: dict, timeout: float) -> dict:
    """Send one streamed completion; what arrived and when (perf_counter seconds)."""
    out = {"start": time.perf_counter(), "first": None, "gaps": [], "tokens": None, "finish": None,
           "done": False, "error": None, "text": ""}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            out["error"] = f"HTTP {response.status}: {response.read(300).decode(errors='replace')}"
            return out
        last = None
        for line in response:  # http.client undoes the chunked encoding line by line, as it arrives
            if not line.startswith(b"data: "):
                continue
            now, data = time.perf_counter(), line[6:].strip()
            if data == b"[DONE]":
                out["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out["error"] = f"stream error: {chunk['error'].get('message')}"
                break
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if last is None:
                    out["first"] = now - out["start"]
                else:
                    out["gaps"].append(now - last)
                last = now
                out["text"] += choice["text"]
                out["finish"] = choice["finish_reason"] or out["finish"]
    except (OSError, ValueError, KeyError, http.client.HTTPException) as error:
        out["error"] = f"{type(error).__name__}: {error}"
    finally:
        out["end"] = time.perf_counter()
        connection.close()
    tokens, wanted = out["tokens"], body["max_tokens"]
    # "length" must have run all max_tokens; "stop" only where the random model drew EOS before.
    fits = tokens is not None and (tokens == wanted if out["finish"] == "length"
                                   else out["finish"] == "stop" and tokens < wanted)
    if out["error"] is None and not (out["done"] and fits):
        out["error"] = f"incomplete: finish_reason {out['finish']}, [DONE] {out['done']}, {tokens} of {wanted} tokens"
    return out


def run_phase(port: int, requests: list, clients: int, stagger_s: float, opts) -> tuple:
    """`clients` threads taking requests from the list in order; the results by index (times from the
    phase's start) and the phase's wall time."""
    results = [None] * len(requests)
    taken, lock = iter(range(len(requests))), threading.Lock()
    start = time.perf_counter()

    def client(i: int):
        time.sleep(i * stagger_s)
        arrival = True
        while time.perf_counter() - start < opts.duration:
            with lock:
                index = next(taken, None)
            if index is None:
                return
            results[index] = {**stream_completion(port, requests[index], opts.timeout), "arrival": arrival}
            arrival = False

    # Daemon threads: Ctrl-C leaves through main's finally without waiting for them.
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if result is not None:  # times from the phase's start, for the per-request records
            result["start"], result["end"] = result["start"] - start, result["end"] - start
    return results, max([r["end"] for r in results if r is not None], default=time.perf_counter() - start)


def percentile(values: list, q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    position = q / 100 * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.loads(response.read())


def summarize(results: list, wall_s: float, before: dict, after: dict) -> dict:
    """A phase's figures; `before` and `after` are /health around it. The TTFTs of the requests that were
    not their client's first are kept apart too: they tell a queue of arriving clients from the steady state."""
    sent = [r for r in results if r is not None]
    good = [r for r in sent if r["error"] is None]
    tokens = sum(r["tokens"] for r in good)
    # Tokens made by decode steps: each reply's first comes from its prefill; an EOS is drawn but not counted.
    decoded = sum(r["tokens"] - 1 + (r["finish"] == "stop") for r in good)
    steps = after["steps"] - before["steps"]
    gaps = [g for r in good for g in r["gaps"]]
    ttfts = [r["first"] for r in good]
    return {
        "requests": len(sent), "errors": len(sent) - len(good), "wall_s": wall_s,
        "requests_per_s": len(good) / wall_s, "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "ttft_after_arrivals_s": sorted(r["first"] for r in good if not r["arrival"]),
        "token_gap_p50_s": percentile(gaps, 50), "token_gap_p99_s": percentile(gaps, 99),
        "largest_batch": after["largest_batch"], "mean_batch": decoded / steps if steps else float("nan"),
        "error_samples": [r["error"] for r in sent if r["error"] is not None][:5],
        "per_request": [None if r is None else {
            "sent_s": r["start"], "ttft_s": r["first"], "ended_s": r["end"], "completion_tokens": r["tokens"],
            "chunks": len(r["gaps"]) + (r["first"] is not None), "finish_reason": r["finish"], "error": r["error"],
            "first_of_its_client": r["arrival"]}
            for r in results],
    }


def start_server(ckpt_dir: Path, opts, max_seq_len: int, log) -> tuple:
    """`python -m llama.serve` on loopback and a free port: (process, port), at once."""
    with socket.socket() as probe:  # a port free now; the server names it if taken meanwhile
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "llama.serve", "--ckpt_dir", str(ckpt_dir), "--host", "127.0.0.1",
               "--port", str(port), "--max_batch_size", str(opts.max_batch_size or opts.clients),
               "--max_seq_len", str(max_seq_len), "--model_name", MODEL]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), port


def normal_policy() -> str:
    """Leave a real-time policy for the normal one (the server started here inherits it); what this
    process was started under. Under `chrt -f` (which steadies the other benchmarks) Linux's throttling
    of real-time threads (sched_rt_runtime_us: 0.95 s of each second by default) stops a server that
    keeps the cores busy for ~50 ms every second, a stall that lands on whichever first tokens are
    being made then; and real-time clients would preempt a normal server at every chunk they read
    (benchmarks/NOTES.md). A server is not run that way."""
    policy = os.sched_getscheduler(0)
    if policy in (os.SCHED_FIFO, os.SCHED_RR):  # not BATCH or IDLE, which a user chose
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # lowering needs no privilege
    return policy_name(policy)


def policy_name(policy: int) -> str:
    names = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, name)}
    return names.get(policy, f"policy {policy}")


def wait_until_healthy(process, port: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering")
        try:
            health(port)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")


def stop_server(process) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def print_report(phases: dict) -> dict:
    """The table, the ratios and the targets, PASS or FAIL; the targets' figures."""
    print(f"{'phase':<14} {'requests':>8} {'errors':>6} {'wall s':>7} {'req/s':>6} {'tok/s':>7} "
          f"{'TTFT p50/p99 ms':>16} {'token gap p50/p99 ms':>21} {'largest/mean batch':>19}")
    for label, p in phases.items():
        print(f"{label:<14} {p['requests']:>8} {p['errors']:>6} {p['wall_s']:>7.1f} {p['requests_per_s']:>6.2f} "
              f"{p['tokens_per_s']:>7.1f} {ms(p['ttft_p50_s']) + ' / ' + ms(p['ttft_p99_s']):>16} "
              f"{ms(p['token_gap_p50_s']) + ' / ' + ms(p['token_gap_p99_s']):>21} "
              f"{p['largest_batch']:>11} / {p['mean_batch']:<5.1f}")
        for sample in p["error_samples"]:
            print(f"  error: {sample}")
    print("tok/s: completion tokens (the server's usage counts) over the phase's wall time, first request sent "
          "to last reply ended; token gap: between successive chunks of one stream; mean batch: rows per decode step")
    (_, one), (name, many) = phases.items()
    late = many["ttft_after_arrivals_s"]
    print(f"TTFT p50/p99 of the {len(late)} requests that were not their client's first: "
          f"{ms(percentile(late, 50))} / {ms(percentile(late, 99))} ms")
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    # A lone request's TTFT is its prefill and one sampled token with nothing ahead of it:
    # an upper bound of one prompt's prefill.
    prefill = one["ttft_p50_s"]
    bound = 2 * one["ttft_p50_s"] + prefill
    targets = {"tokens_per_s_ratio": ratio, "tokens_per_s_ratio_pass": ratio >= 4,
               "ttft_p99_bound_s": bound, "ttft_p99_pass": many["ttft_p99_s"] <= bound}
    print(f"tokens/s, {name} / one at a time: {ratio:.2f}x (target >= 4x): "
          f"{'PASS' if targets['tokens_per_s_ratio_pass'] else 'FAIL'}")
    print(f"TTFT p99, {name}: {ms(many['ttft_p99_s'])} ms (target <= 2 x {ms(one['ttft_p50_s'])} ms, a lone "
          f"request's p50, + {ms(prefill)} ms of prefill, taken as that same lone TTFT, an upper bound, "
          f"= {ms(bound)} ms): {'PASS' if targets['ttft_p99_pass'] else 'FAIL'}")
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the second phase")
    parser.add_argument("--max-batch-size", type=int, default=None, help="the server's; default: --clients")
    parser.add_argument("--requests", type=int, default=48, help="length of the request list (both phases)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="longest prompt, in tokens (BOS included)")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    parser.add_argument("--temperature", type=float, default=None, help="default: the server's own")
    parser.add_argument("--duration", type=float, default=600, help="seconds after which a phase starts no request")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a request's socket may wait")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request list")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    opts = parser.parse_args(argv)
    if min(opts.clients, opts.requests, opts.prompt_tokens, opts.max_tokens) < 1:
        parser.error("--clients, --requests, --prompt-tokens and --max-tokens must be at least 1")
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # before minutes of writing weights
        parser.error(f"the server needs {' and '.join(missing)}: run pip install -e \".[serve]\"")

    started_under = normal_policy()
    print(cpu_description() + ("" if started_under not in ("SCHED_FIFO", "SCHED_RR") else
                               f" (started under {started_under}; left for SCHED_OTHER: see normal_policy)"), flush=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # SIGTERM too stops the server on the way out (the finally below)

    signal.signal(signal.SIGTERM, interrupt)
    process = None
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder, open(Path(folder) / "server.log", "wb") as log:
        try:
            tokenizer = make_checkpoint(Path(folder))
            # On disk now: the kernel writes dirty pages back ~30 s after they were written (here
            # ~400 MB), which would fall inside a phase, its flusher threads taking the cores' time.
            os.sync()
            requests = make_requests(tokenizer, opts)
            sizes = [len(tokenizer.encode(r["prompt"], bos=True, eos=False)) for r in requests]
            process, port = start_server(Path(folder), opts, max(sizes) + opts.max_tokens, log)
            wait_until_healthy(process, port)
            # Not counted: the first request pays for what the server does once (threads, first touches).
            stream_completion(port, {**requests[0], "max_tokens": 8}, opts.timeout)
            before = health(port)
            lone, wall = run_phase(port, requests, 1, 0.0, opts)
            middle = health(port)
            phases = {"one at a time": summarize(lone, wall, before, middle)}
            lone_s = percentile([r["end"] - r["start"] for r in lone if r is not None and r["error"] is None], 50)
            stagger_s = 0.0 if math.isnan(lone_s) else lone_s / opts.clients
            together, wall = run_phase(port, requests, opts.clients, stagger_s, opts)
            phases[f"{opts.clients} clients"] = summarize(together, wall, middle, health(port))
        except KeyboardInterrupt:
            print("interrupted")
            return 130
        finally:
            if process is not None and stop_server(process) != 0:
                log.flush()
                print(f"the server exited with status {process.returncode}; the end of its log:\n"
                      + (Path(folder) / "server.log").read_text(errors="replace")[-3000:])

    print(f"\n{len(requests)} streamed /v1/completions, prompts {min(sizes)}-{max(sizes)} tokens, max_tokens "
          f"{opts.max_tokens // 2}-{opts.max_tokens}, temperature "
          f"{'the server default' if opts.temperature is None else opts.temperature}; the {opts.clients} clients "
          f"arrive over {lone_s:.1f} s (a lone request's median duration), one every {stagger_s * 1000:.0f} ms")
    same = sum(a is not None and b is not None and a["error"] is None and b["error"] is None and a["text"] == b["text"]
               for a, b in zip(lone, together))
    report = {"machine": cpu_description(), "started_under": started_under, "options": vars(opts), "stagger_s": stagger_s,
              "targets": print_report(phases), "same_text": same, "server_exit_status": process.returncode,
              "phases": phases}
    print(f"same text as one at a time (each request brings its seed): {same} of {len(requests)}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.json}")
    errors = sum(p["errors"] for p in phases.values())
    return 1 if errors or process.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
