"""An OpenAI-compatible HTTP server over one `Llama`, with continuous batching.

    python -m llama.serve --ckpt_dir DIR [--host 127.0.0.1] [--port 8000] [--max_batch_size 8] ...
    torchrun --nproc_per_node N -m llama.serve --ckpt_dir DIR_WITH_N_SHARDS ...

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
checkpoint family's chat format, as `chat_completion` builds it), each in
OpenAI's shapes, with `stream: true` as server-sent events; GET /health.
Requests join the running batch at the next step (`llama.batching`). Rank
0 serves HTTP; under torchrun the other ranks follow its steps. Needs the
serve extra: pip install -e ".[serve]". Details: docs/serving.md.
"""

import gc
import ipaddress
import signal
import socket
import threading
from typing import TYPE_CHECKING, List, Literal, Optional

from llama.cli import print_error, run

if TYPE_CHECKING:
    from llama.server import Server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, taken before the weights load: a port in use is named
    at once, not after loading, and no one can take it meanwhile. uvicorn listens on it.
    Raises ValueError for a port or host that cannot be bound."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"host {host!r} is not an address this machine can listen on: {error}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m llama.serve`: parse the command line for `start`, run it, and exit."""
    run(start, argv, prog="python -m llama.serve")


def start(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 1024,
    quantize: Optional[Literal["int8", "int4"]] = None,
    group_size: Optional[int] = None,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    seed: int = 1,
    device: Optional[str] = None,
    heartbeat_s: float = 60.0,
    collective_timeout_s: float = 120.0,
):
    """Serve a Llama checkpoint over HTTP in OpenAI's API (completions, chat completions, streaming), with continuous batching.

    Args:
        ckpt_dir: checkpoint directory (params.json, consolidated.NN.pth); none: a tiny random demo checkpoint
        tokenizer_path: tokenizer.model; none: the one in --ckpt_dir or its parent
        host: address to listen on; the default answers this machine only
        port: TCP port to listen on
        max_batch_size: requests decoded at once; more wait for a free row
        max_seq_len: longest prompt plus reply, in tokens
        quantize: store the weight matrices as int8 or int4 (docs/compressed-weights.md); none: as loaded
        group_size: int4 only: inputs per scale, 32, 64, 128 or 256; none: 32
        api_key: when given, every request must send 'Authorization: Bearer KEY'
        model_name: the model's id in the API; none: the checkpoint directory's name
        seed: seed of the first request that brings none (the next gets seed + 1, ...)
        device: cpu, cuda or cuda:N; none: this process's GPU if there is one, else the CPU
        heartbeat_s: under torchrun, how often an idle rank 0 wakes the other ranks
        collective_timeout_s: under torchrun, how long a rank waits for another before all stop, naming it
    """
    try:
        import starlette  # noqa: F401  (both for llama.server)
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as error:
        print_error(f"python -m llama.serve needs the package {error.name}: run pip install -e \".[serve]\" "
                    "in the llama checkout")
        raise SystemExit(1) from None
    from pathlib import Path

    from llama import Llama
    from llama.batching import Engine
    from llama.chat_repl import check_heartbeat
    from llama.demo import check_device, check_request, resolve_checkpoint
    from llama.distributed import exit_when_a_peer_is_lost, is_first_rank, launch_variable
    from llama.generation import check_seed
    from llama.server import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Server

    check_device(device)
    check_seed(seed)
    check_heartbeat(heartbeat_s, collective_timeout_s)
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key must not be empty")
    # torchrun's rank 0, or a plain run: the one that listens.
    sock = bind(host, port) if launch_variable("RANK", 0) == 0 else None
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    check_request(tokenizer_path, max_seq_len, max_batch_size, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, None)
    llama = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        collective_timeout_s=collective_timeout_s,
        quantize=quantize,
        group_size=group_size,
    )
    engine = Engine(llama, seed=seed, heartbeat_s=heartbeat_s)
    freeze_startup_heap()
    with exit_when_a_peer_is_lost():
        if not is_first_rank():
            # torchrun passes a Ctrl-C or SIGTERM on to every rank at once. Rank 0 then stops
            # the engine and tells this rank so; a rank that left first would make that a
            # lost-rank error. If rank 0 is gone instead, the next collective ends this rank.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            engine.follow()
            return
        name = model_name or Path(ckpt_dir).resolve().name
        server = Server(llama, engine, name, api_key=api_key)
        serve(server, sock, host, port)


def freeze_startup_heap() -> None:
    """Keep what startup made (the model's modules, the tokenizer's tables, the libraries: all of
    it lives as long as the server) out of the garbage collector's walks: a full collection went
    over ~180k objects for the 100M demo, ~90 ms holding the GIL, a pause of the engine's draws
    and of every stream (benchmarks/NOTES.md). What startup left unreachable is collected first.
    As vLLM, SGLang and Ray Serve do after startup."""
    gc.collect()
    gc.freeze()


def serve(server: "Server", sock: socket.socket, host: str, port: int) -> None:
    """Rank 0: HTTP and the engine on threads of their own until SIGINT or SIGTERM; then the
    engine stops (releasing the other ranks) and this returns. Raises what ended the engine."""
    import uvicorn

    failure: List[BaseException] = []
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", access_log=False)
    http = uvicorn.Server(config)

    def engine_thread():
        try:
            server.engine.run()
        except BaseException as error:  # noqa: BLE001: raised again on the main thread
            failure.append(error)
        finally:
            http.should_exit = True

    signalled: List[int] = []

    def stop(signum, frame):
        signalled.append(signum)
        http.should_exit = True

    # HTTP runs on a thread, so uvicorn leaves the signals to this one: it would raise a
    # caught SIGTERM again on leaving, ending the process before the other ranks are released.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=engine_thread, name="llama-engine", daemon=True)
    listener = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="llama-http", daemon=True)
    worker.start()
    listener.start()
    if not is_loopback(host) and server.api_key is None:
        print_error(f"listening on {host}, beyond this machine, with no --api-key: anyone who can reach it can use it")
    print(f"llama.serve: {server.model_name} at http://{host}:{port}/v1 (max_batch_size "
          f"{server.engine.capacity}, max_seq_len {server.max_seq_len}); Ctrl-C stops", flush=True)
    try:
        frozen = False
        while listener.is_alive():
            listener.join(0.1 if not frozen else 0.5)
            if not frozen and http.started:  # and what uvicorn made as it started, once
                freeze_startup_heap()
                frozen = True
    finally:
        http.should_exit = True
        server.engine.stop()
        worker.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    if not signalled:
        raise RuntimeError("the HTTP server stopped on its own (see the lines above)")


if __name__ == "__main__":
    main()
