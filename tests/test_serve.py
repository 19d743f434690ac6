"""`python -m llama.serve` on a tiny checkpoint, on loopback: the real `openai` client for
completions, chat and streaming, raw HTTP for the errors, and the same tokens alone and
inside a batch (issue 21)."""

import json
import subprocess
import sys
import threading
import time

import urllib.error
import urllib.request

import pytest
import torch

from conftest import REPO, free_port, subprocess_env

openai = pytest.importorskip("openai", reason="the test extra installs openai")
pytest.importorskip("uvicorn", reason="the test extra installs the serve extra's uvicorn")

KEY = "test-key-1234"
MODEL = "tiny"


class Response:
    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def request(url: str, data: bytes = None, headers=None, timeout: float = 30) -> Response:
    """Raw HTTP with the standard library: the status and body, 4xx and 5xx included."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Response(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read().decode())


def wait_for_health(proc, url: str, timeout: float, kill) -> None:
    """Return once `url`/health answers; fail with the server's stderr if `proc` exits
    first, or after calling `kill` when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{proc.stderr.read()[-4000:]}")
        try:
            if request(url + "/health", timeout=2).status_code == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    kill()
    raise AssertionError("the server did not answer /health in time")


def start_server(args, env=None, timeout=120):
    """A `python -m llama.serve` child and its base URL, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama.serve", "--port", str(port), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, timeout, proc.kill)
    return proc, url


def stop_server(proc) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    return err


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    proc, url = start_server(["--ckpt_dir", tiny_ckpt, "--max_seq_len", 128, "--max_batch_size", 8,
                              "--api-key", KEY, "--model_name", MODEL])
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def health(url):
    return request(url + "/health", timeout=10).json()


def reference_completion(generator, prompt, seed, **options):
    torch.manual_seed(seed)
    return generator.text_completion([prompt], **options)[0]["generation"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert health(server)["status"] == "ok"


def test_a_request_alone_gets_text_completions_tokens(client, generator):
    for seed, prompt in [(3, "The llama café"), (11, "Once upon a time")]:
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=25, temperature=0.8, top_p=0.9,
                                          seed=seed)
        expected = reference_completion(generator, prompt, seed, max_gen_len=25, temperature=0.8, top_p=0.9)
        assert reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == len(generator.tokenizer.encode(prompt, bos=True, eos=False))
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_defaults_are_the_librarys(client, generator):
    # No temperature or top_p: the library's 0.6 and 0.9, as text_completion's defaults.
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, seed=5)
    assert reply.choices[0].text == reference_completion(generator, "Hello", 5, max_gen_len=20)


def test_chat_alone_gets_chat_completions_answer(client, generator):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is a llama?"}]
    reply = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=30, temperature=0.7, seed=9)
    torch.manual_seed(9)
    expected = generator.chat_completion([dialog], temperature=0.7, max_gen_len=30)[0]["generation"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["content"]
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streams_join_to_the_whole_answer(client):
    options = dict(model=MODEL, max_tokens=40, temperature=0.9, seed=21)
    whole = client.completions.create(prompt="The river", **options).choices[0].text
    chunks = list(client.completions.create(prompt="The river", stream=True, **options))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(messages=messages, **options).choices[0].message.content
    stream = client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True},
                                            **options)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_stop_texts_and_logprobs(client, generator):
    options = dict(model=MODEL, prompt="Tell me", max_tokens=40, temperature=0.8, seed=4)
    full = client.completions.create(**options).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3
    cut = client.completions.create(stop=[stop, "never here"], **options).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **options))
    assert streamed == cut.text

    reply = client.completions.create(logprobs=3, **options).choices[0]
    assert reply.text == full  # log-probabilities change no draw
    lp = reply.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(top) <= 3 for top in lp.top_logprobs)
    # The first token's log-probability, from the reference's logits of the prompt.
    prompt = generator.tokenizer.encode("Tell me", bos=True, eos=False)
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor([prompt]), 0)[0, -1]
    logprobs = torch.log_softmax(logits, -1)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(float(logprobs.max()), abs=1e-4)


def test_a_seeded_request_gets_the_same_tokens_inside_a_batch_of_8(server, client):
    seeded = dict(model=MODEL, prompt="The llama café", max_tokens=60, temperature=0.9, top_p=0.95, seed=77)
    alone = client.completions.create(**seeded).choices[0].text
    others = [
        lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=80, temperature=1.0),
        lambda: client.completions.create(model=MODEL, prompt="Numbers: 1 2 3", max_tokens=10, temperature=0),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=50, seed=1),
        lambda: list(client.completions.create(model=MODEL, prompt="Why", max_tokens=70, stream=True)),
        lambda: client.completions.create(model=MODEL, prompt="x y z", max_tokens=90, stop=["\n"], logprobs=2),
        lambda: list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                    max_tokens=40, stream=True, temperature=0.3)),
        lambda: client.completions.create(model=MODEL, prompt="Once upon a time there was a", max_tokens=30),
    ]
    results, errors = {}, []
    start = threading.Barrier(len(others) + 1)

    def run(key, call):
        try:
            start.wait()
            results[key] = call()
        except Exception as error:  # noqa: BLE001: reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(others)]
    threads.append(threading.Thread(target=run, args=("seeded", lambda: client.completions.create(**seeded))))
    before = health(server)["largest_batch"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results["seeded"].choices[0].text == alone
    assert max(before, health(server)["largest_batch"]) >= 4  # they did run together


def post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return request(url + path, content, {**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 500}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("/v1/completions", {"model": MODEL, "prompt": ["one", "two"]}, 400, "prompt", None),
        ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
        ("/v1/completions", {"prompt": "hi"}, 400, "model", None),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400,
         "messages", None),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400,
         "messages[0].content", None),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "top_logprobs": 2}, 400, "top_logprobs", None),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, path, body, status, param, code):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code
    assert error["message"] and "Traceback" not in response.text


def test_malformed_json_a_wrong_key_and_an_unknown_path(server, client):
    for raw in ("{bad", "[1, 2]", "\xff"):
        response = post(server, "/v1/completions", None, raw=raw.encode("latin-1"))
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    for key in ("wrong", None):
        response = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    response = request(server + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    # Still serving.
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].finish_reason == "length"


def test_it_binds_to_loopback_unless_told(server):
    import inspect

    from llama.serve import is_loopback, start

    assert inspect.signature(start).parameters["host"].default == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


def test_a_port_in_use_is_named_before_loading(tiny_ckpt, server):
    port = int(server.rsplit(":", 1)[1])
    proc = subprocess.run([sys.executable, "-m", "llama.serve", "--ckpt_dir", str(tiny_ckpt), "--port", str(port)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Loaded in" not in proc.stdout and "Traceback" not in proc.stderr


def test_a_client_that_leaves_mid_stream_frees_its_row_at_once(tiny_ckpt):
    # In this process, so that each step can be slowed: the request would run for seconds.
    import http.client

    import uvicorn

    from llama import Llama
    from llama.batching import Engine
    from llama.server import Server
    from test_batching import SlowSteps

    llama = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=2,
                        device="cpu")
    engine = Engine(llama)
    engine.step = SlowSteps(llama)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(Server(llama, engine, MODEL).app(), host="127.0.0.1", port=port,
                                         log_level="warning"))
    threads = [threading.Thread(target=engine.run, daemon=True), threading.Thread(target=web.run, daemon=True)]
    for t in threads:
        t.start()
    try:
        while not web.started:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "stream": True, "seed": 3}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the first token has come
        steps_then = engine.steps
        connection.close()  # the client leaves
        deadline = time.monotonic() + 5
        while engine.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.in_flight() == 0 and engine.dropped == 1
        assert engine.steps - steps_then < 20  # freed within a few 20 ms steps, not after all 100 tokens
    finally:
        web.should_exit = True
        engine.stop()
        for t in threads:
            t.join(30)


def test_startup_objects_are_set_aside_from_the_garbage_collector_before_serving(tiny_ckpt, monkeypatch):
    # A full collection walks every object Python tracks, holding the GIL: the model's modules,
    # the tokenizer's tables and the libraries live as long as the server, so start() freezes
    # them before it serves, and later walks meet only what requests make.
    import gc

    from llama import serve

    seen = []

    def record(server, sock, host, port):  # in place of serving: what the heap looks like then
        seen.append((gc.get_freeze_count(), len(gc.get_objects())))
        sock.close()

    monkeypatch.setattr(serve, "serve", record)
    gc.unfreeze()
    try:
        serve.start(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), port=free_port(), max_seq_len=64,
                    max_batch_size=2, device="cpu")
        frozen, walked = seen[0]
        assert frozen > 10_000 and walked < frozen / 10, (frozen, walked)
    finally:
        gc.unfreeze()


def test_what_uvicorn_makes_as_it_starts_is_frozen_once_it_answers(generator, monkeypatch):
    # start() freezes the heap before serve() starts uvicorn; uvicorn's own startup (the app, its
    # routes, the event loop) is frozen once it answers, and only once.
    import gc
    import os
    import signal

    from llama import serve
    from llama.batching import Engine
    from llama.server import Server

    port, calls = free_port(), []

    def freeze():
        status = request(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        calls.append((status, gc.get_freeze_count()))
        os.kill(os.getpid(), signal.SIGTERM)  # serve()'s own handler: it stops, as on Ctrl-C

    monkeypatch.setattr(serve, "freeze_startup_heap", freeze)
    server = Server(generator, Engine(generator), MODEL)
    gc.unfreeze()
    try:
        serve.serve(server, serve.bind("127.0.0.1", port), "127.0.0.1", port)
    finally:
        gc.unfreeze()
    assert calls == [(200, 0)]
