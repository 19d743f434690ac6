"""The HTTP side of `python -m llama.serve`: OpenAI's API over the continuous-batching engine.

`Server.app()` is a Starlette application: it checks each request (OpenAI-shaped
JSON errors with 4xx codes for what it refuses), hands it to the engine
(`llama.batching`) and shapes the engine's events into OpenAI's responses,
whole or as server-sent events. docs/serving.md lists the fields it takes.
"""

import asyncio
import hmac
import json
import math
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llama.batching import Engine, Event, Request
from llama.chat_format import UNSAFE_ERROR
from llama.generation import Llama
from llama.tokenizer import check_encodable

# What a request may leave out: the library's own defaults (Meta's), so that a
# request served alone matches `text_completion` / `chat_completion`.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
MAX_STOP_TEXTS = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """A request the server refuses: answered with OpenAI's error shape and `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- reading a request's fields ----------------------------------------------------------------


def _field(body: Dict[str, Any], name: str, kinds, default=None, nullable: bool = True):
    value = body.get(name, default)
    if value is None and nullable:
        return default
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # true/false is no number here
    if not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {json.dumps(body.get(name))}", param=name)
    return value


def _number(body, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(_field(body, name, (int, float), default))
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise ApiError(400, f"'{name}' must be {bound}, got {body.get(name)}", param=name)
    return value


class Sampling:
    """What a completion request asks for, besides its prompt."""

    def __init__(self, body: Dict[str, Any], chat: bool):
        self.stream = _field(body, "stream", (bool,), False)
        self.temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
        self.top_p = _number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0, low_open=True)
        self.seed = _field(body, "seed", (int,))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ApiError(400, f"'seed' must be a 64-bit integer, got {self.seed}", param="seed")
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        self.max_tokens = None
        for name in names:
            value = _field(body, name, (int,))
            if value is not None:
                if value < 1:
                    raise ApiError(400, f"'{name}' must be at least 1, got {value}", param=name)
                self.max_tokens = value
                break
        stop = body.get("stop")
        if stop is None:
            self.stop: List[str] = []
        elif isinstance(stop, str):
            self.stop = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            self.stop = stop
        else:
            raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")
        if len(self.stop) > MAX_STOP_TEXTS:
            raise ApiError(400, f"'stop' takes at most {MAX_STOP_TEXTS} strings, got {len(self.stop)}", param="stop")
        if _field(body, "n", (int,), 1) != 1:
            raise ApiError(400, "'n' must be 1: this server gives one choice per request", param="n")
        if chat:
            wanted = _field(body, "logprobs", (bool,), False)
            top = _field(body, "top_logprobs", (int,))
            if top is not None and not wanted:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        else:
            top = _field(body, "logprobs", (int,))
            wanted = top is not None
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'{'top_logprobs' if chat else 'logprobs'}' must be from 0 to {MAX_TOP_LOGPROBS}",
                           param="top_logprobs" if chat else "logprobs")
        self.top_logprobs = (top or 0) if wanted else None
        options = _field(body, "stream_options", (dict,), {})
        self.include_usage = bool(options.get("include_usage", False))
        for name, neutral in (("echo", False), ("suffix", None), ("best_of", 1), ("presence_penalty", 0),
                              ("frequency_penalty", 0), ("logit_bias", None), ("tools", None),
                              ("response_format", None)):
            value = body.get(name)
            if value is not None and value != neutral and value not in ([], {}):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)


def _prompt_text(body: Dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    return prompt


def _dialog(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages", param="messages")
    dialog = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                                   param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        dialog.append({"role": message["role"], "content": content})
    return dialog


# -- the server --------------------------------------------------------------------------------


class Server:
    """The HTTP side: checks requests, hands them to the engine, shapes its events."""

    def __init__(self, llama: Llama, engine: Engine, model_name: str, api_key: Optional[str] = None):
        self.llama = llama
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.max_seq_len = llama.model.params.max_seq_len
        self.created = int(time.time())

    def app(self):
        async def http_error(request, error: HTTPException):
            kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
            return JSONResponse(ApiError(error.status_code, str(error.detail), kind=kind).body(),
                                status_code=error.status_code)

        async def unexpected(request, error: Exception):
            return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                         kind="server_error").body(), status_code=500)

        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error, Exception: unexpected},
        )

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request):
        engine = self.engine
        return JSONResponse({"status": "ok", "model": self.model_name, "in_flight": engine.in_flight(),
                             "steps": engine.steps, "largest_batch": engine.largest_batch,
                             "dropped": engine.dropped})

    def _model_card(self) -> Dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama"}

    async def models(self, request):
        return await self._answer(request, lambda: JSONResponse({"object": "list", "data": [self._model_card()]}))

    async def model(self, request):
        def card():
            self._check_model({"model": request.path_params["model"]})
            return JSONResponse(self._model_card())

        return await self._answer(request, card)

    async def completions(self, request):
        return await self._answer(request, None, chat=False)

    async def chat_completions(self, request):
        return await self._answer(request, None, chat=True)

    async def _answer(self, request, respond, chat: bool = False):
        try:
            self._check_key(request)
            if respond is not None:
                return respond()
            body = await self._body(request)
            return await self._complete(request, body, chat)
        except ApiError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse(error.body(), status_code=error.status, headers=headers)

    # -- checks -------------------------------------------------------------------------------

    def _check_key(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @staticmethod
    async def _body(request) -> Dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _check_model(self, body: Dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be given, as a string", param="model")
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist here; this server has '{self.model_name}'",
                           param="model", code="model_not_found", kind="not_found_error")

    def _prompt_tokens(self, body: Dict[str, Any], chat: bool) -> Tuple[List[int], bool]:
        """The prompt's token ids, and whether the dialog is one the chat format refuses."""
        llama = self.llama
        try:
            if chat:
                dialog = _dialog(body)
                for message in dialog:
                    check_encodable(message["content"], "a message")
                return llama.family.encode_dialog(llama.tokenizer, dialog), llama.family.refuses(dialog)
            prompt = _prompt_text(body)
            check_encodable(prompt, "the prompt")
            return llama.tokenizer.encode(prompt, bos=True, eos=False), False
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error), param="messages" if chat else "prompt") from None

    def _max_tokens(self, sampling: Sampling, prompt_len: int, chat: bool) -> int:
        room = self.max_seq_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; this server's max_seq_len of {self.max_seq_len} "
                           "leaves no room for a reply", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if sampling.max_tokens is None:
            return room
        if sampling.max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) and max_tokens ({sampling.max_tokens}) pass this "
                           f"server's max_seq_len of {self.max_seq_len}; at most {room} new tokens fit",
                           param="max_tokens", code="context_length_exceeded")
        return sampling.max_tokens

    # -- a completion ---------------------------------------------------------------------------

    async def _complete(self, request, body: Dict[str, Any], chat: bool):
        self._check_model(body)
        sampling = Sampling(body, chat)
        prompt_tokens, refused = self._prompt_tokens(body, chat)
        max_tokens = self._max_tokens(sampling, len(prompt_tokens), chat)
        reply = _Reply(self, chat, len(prompt_tokens), sampling)
        channel = _Channel(asyncio.get_running_loop())
        job = Request(prompt_tokens, max_tokens, sampling.temperature, sampling.top_p, self.llama.stop_tokens,
                      channel.sink, seed=sampling.seed, stop_texts=sampling.stop, top_logprobs=sampling.top_logprobs)
        if refused:
            # As chat_completion answers a dialog holding the format's own tags (llama.family).
            channel.queue.put_nowait(Event(text=UNSAFE_ERROR, finish_reason="stop"))
        else:
            try:
                self.engine.submit(job)
            except RuntimeError as error:
                raise ApiError(503, f"the server is stopping: {error}", kind="server_error") from None
        if sampling.stream:
            return StreamingResponse(self._stream(job, channel, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(channel.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({})  # nobody reads it; the row is freed below
                    continue
                if event.error is not None:
                    raise ApiError(500, event.error, kind="server_error")
                reply.add(event)
                if event.finish_reason is not None:
                    return JSONResponse(reply.whole())
        finally:
            self.engine.cancel(job)  # frees the row at the next step if it is still running

    async def _stream(self, job, channel: "_Channel", reply: "_Reply"):
        try:
            first = reply.first_chunk()
            if first is not None:
                yield _sse(first)
            while True:
                event = await channel.queue.get()
                if event.error is not None:
                    yield _sse(ApiError(500, event.error, kind="server_error").body())
                    break
                chunk = reply.chunk(event)
                if chunk is not None:
                    yield _sse(chunk)
                if event.finish_reason is not None:
                    if reply.sampling.include_usage:
                        yield _sse(reply.usage_chunk())
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Also where the client left mid-stream (the task is cancelled): its row is freed
            # at the next step boundary.
            self.engine.cancel(job)


def _sse(payload: Dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Channel:
    """Events from the engine's thread into this request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop has closed: the server is stopping


class _Reply:
    """One response in OpenAI's shapes, whole or as stream chunks."""

    def __init__(self, server: Server, chat: bool, prompt_len: int, sampling: Sampling):
        self.server, self.chat, self.prompt_len, self.sampling = server, chat, prompt_len, sampling
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text: List[str] = []
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.logprobs: List[Any] = []
        self.text_length = 0

    def _piece(self, token: int) -> str:
        return self.server.llama.tokenizer.decode_pieces([token])[0]

    def _logprob_entries(self, event) -> List[Any]:
        entries = []
        for item in event.logprobs:
            token = self._piece(item.token)
            top = [(self._piece(t), lp) for t, lp in item.top]
            if self.chat:
                entries.append({
                    "token": token, "logprob": item.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
                })
            else:
                entries.append((token, item.logprob, dict(top), self.text_length))
        return entries

    def add(self, event) -> List[Any]:
        entries = self._logprob_entries(event)
        self.logprobs += entries
        self.text.append(event.text)
        self.text_length += len(event.text)
        self.completion_tokens += len(event.tokens)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return entries

    def _completion_logprobs(self, entries) -> Optional[Dict[str, Any]]:
        if self.sampling.top_logprobs is None:
            return None
        if self.chat:
            return {"content": entries}
        return {
            "tokens": [e[0] for e in entries],
            "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries],
            "text_offset": [e[3] for e in entries],
        }

    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_len + self.completion_tokens}

    def _envelope(self, obj: str, choices, usage: bool = True) -> Dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name,
               "choices": choices}
        if usage:
            out["usage"] = self.usage()
        return out

    def whole(self) -> Dict[str, Any]:
        text = "".join(self.text)
        logprobs = self._completion_logprobs(self.logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
            return self._envelope("chat.completion", [choice])
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return self._envelope("text_completion", [choice])

    def first_chunk(self) -> Optional[Dict[str, Any]]:
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice], usage=False)

    def chunk(self, event) -> Optional[Dict[str, Any]]:
        entries = self.add(event)
        if not event.text and not entries and event.finish_reason is None:
            return None  # a token that ends no character yet
        logprobs = self._completion_logprobs(entries) if entries else None
        if self.chat:
            delta = {"content": event.text} if event.text or entries else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
            return self._envelope("chat.completion.chunk", [choice], usage=False)
        choice = {"index": 0, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
        return self._envelope("text_completion", [choice], usage=False)

    def usage_chunk(self) -> Dict[str, Any]:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        return out
