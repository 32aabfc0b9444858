"""The OpenAI-compatible HTTP server: FastAPI routes over the in-process AsyncLLM.

    POST /v1/chat/completions   harmony chat: reasoning_content, tool calls, json_schema, streaming
    POST /v1/completions        raw text / token prompts
    GET  /v1/models[/{id}]      the served model names
    GET  /health                200 while the engine runs, 503 when it does not
    GET  /metrics               Prometheus text

A request travels: headers and URL (size-limited: 431 / 414) -> body (size-limited: 413; UTF-8) ->
protocol.parse_request (400 naming the param) -> model
name (404) -> SamplingParams (400) -> chat.prepare_chat (400) -> context-length check (400) ->
AsyncLLM.generate (503 when its queue is full). Streaming answers start only after the first
output, so every error above is a proper status, not an error inside an SSE stream. A client that
disconnects cancels its handler, which aborts the request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import chat_output, prepare_chat
from ..engine.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from ..harmony import ContentDelta, ReasoningDelta, StreamingParser, ToolCallArguments, ToolCallStart
from ..harmony import decode as harmony_decode
from ..sampling_params import SamplingParams, SamplingParamsError
from ..tokenizer import encode
from . import protocol as P
from .protocol import RequestError

log = logging.getLogger("gptoss.serve")

DEFAULT_MAX_REQUEST_BYTES = 16 << 20  # a full 128k-token context is ~0.5 MB of text; this leaves room
# all header names and values together; a bearer key or a few cookies are far below it (nginx's
# default buffers hold 32 KiB as well)
DEFAULT_MAX_HEADER_BYTES = 32 << 10
MAX_URL_BYTES = 8 << 10  # path and query; every route here has a short path and no query
_MAX_WARNED_FIELDS = 64  # distinct ignored field names remembered (and logged) at most


# --- metrics --------------------------------------------------------------------------------------

class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum}",
                f"{name}_count{{{labels}}} {self.count}"]
        return out


class Metrics:
    """Server-side counters; the engine's gauges are read from AsyncLLM.stats() at scrape time."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter = Counter()  # finish reason -> requests
        self.errors: Counter = Counter()  # HTTP status -> requests
        self.ttft = _Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
        self.e2e = _Histogram((0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))

    def request_done(self, prompt_tokens: int, generation_tokens: int, reasons, t_start: float,
                     t_first: float | None) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        for r in reasons:
            self.finished[r] += 1
        if t_first is not None:
            self.ttft.observe(t_first - t_start)
        self.e2e.observe(time.monotonic() - t_start)

    def render(self, stats: dict, model_name: str, running: bool) -> str:
        escaped = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lab = f'model_name="{escaped}"'
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP gptoss:{name} {help_}")
            out.append(f"# TYPE gptoss:{name} {kind}")
            out.extend(samples)

        # single-sample metrics: name, kind, help, value
        for name, kind, help_, value in (
                ("num_requests_running", "gauge", "Sequences in the running batch.", stats["num_requests_running"]),
                ("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", stats["num_requests_waiting"]),
                ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).",
                 stats["kv_cache_usage_perc"]),
                ("engine_running", "gauge", "1 while the engine thread runs, 0 after it failed.", int(running)),
                ("prefix_cache_queries_total", "counter", "Prefix cache lookups.", stats.get("prefix_cache_queries", 0)),
                ("prefix_cache_hits_total", "counter", "Prefix cache hits.", stats.get("prefix_cache_hits", 0)),
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Generated tokens of finished requests.",
                 self.generation_tokens)):
            metric(name, kind, help_, [f"gptoss:{name}{{{lab}}} {value}"])
        metric("request_success_total", "counter", "Finished choices by finish reason.",
               [f'gptoss:request_success_total{{{lab},finished_reason="{r}"}} {c}'
                for r, c in sorted(self.finished.items())])
        metric("request_errors_total", "counter", "Requests answered with an error status.",
               [f'gptoss:request_errors_total{{{lab},status="{s}"}} {c}' for s, c in sorted(self.errors.items())])
        metric("time_to_first_token_seconds", "histogram", "Time from request to first output.",
               self.ttft.lines("gptoss:time_to_first_token_seconds", lab))
        metric("e2e_request_latency_seconds", "histogram", "Time from request to last output.",
               self.e2e.lines("gptoss:e2e_request_latency_seconds", lab))
        return "\n".join(out) + "\n"


# --- helpers --------------------------------------------------------------------------------------

class _ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    await _wait_disconnect_raw(request.receive)


async def _wait_disconnect_raw(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """Run `coro`; if the client goes away first, cancel it (which aborts its engine request)."""
    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _ClientGone


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a client that leaves mid-stream
    aborts the engine request at once instead of when the generator is collected."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        # uvicorn drops writes to a closed connection without raising, so the stream would run to
        # its end; watching for the disconnect message ourselves stops it at once
        streamer = asyncio.ensure_future(super().__call__(scope, receive, send))
        listener = asyncio.ensure_future(_wait_disconnect_raw(receive))
        try:
            await asyncio.wait({streamer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, listener):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.body_iterator.aclose()


class _HeaderLimit:
    """ASGI middleware: a request whose headers (431) or URL (414) are over the limit is answered
    before any route runs. uvicorn's own parser limit is set above ours (see `_uvicorn_config`) so
    that oversized headers get this clear answer instead of a dropped connection."""

    def __init__(self, app, max_header_bytes: int, metrics: Metrics):
        self.app, self.max_header_bytes, self.metrics = app, max_header_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            url = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string") or b"")
            problem = None
            if size > self.max_header_bytes:
                problem = (431, f"the request headers take {size} bytes; the server accepts at most "
                                f"{self.max_header_bytes} (--max-header-bytes)", "request_headers_too_large")
            elif url > MAX_URL_BYTES:
                problem = (414, f"the request URL is {url} bytes long; at most {MAX_URL_BYTES} are accepted",
                           "uri_too_long")
            if problem is not None:
                status, message, code = problem
                self.metrics.errors[status] += 1
                resp = JSONResponse(P.error_body(message, "invalid_request_error", None, code), status_code=status,
                                    headers={"Connection": "close"})
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def _uvicorn_config(app: FastAPI, **kw):
    import uvicorn
    # h11 answers 400 and drops a connection whose unparsed head outgrows this buffer; keep it well
    # above our own limit so that _HeaderLimit answers 431 for all but absurd heads (over 1 MiB)
    limit = getattr(app.state, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES)
    return uvicorn.Config(app, http="h11", h11_max_incomplete_event_size=max(4 * limit, 1 << 20), **kw)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _grammar_errors() -> tuple[type[BaseException], ...]:
    try:
        from ..harmony.grammar import GrammarError
        return (GrammarError,)
    except ImportError:
        return ()


def _merge_text(deltas) -> list:
    """Join runs of reasoning / content deltas so one token step gives few chunks."""
    out: list = []
    for d in deltas:
        if out and isinstance(d, (ReasoningDelta, ContentDelta)) and type(out[-1]) is type(d):
            out[-1] = type(d)(out[-1].text + d.text)
        else:
            out.append(d)
    return out


def _cut_stop(text: str | None, stop) -> str | None:
    """Drop a stop string (and what follows) from parsed text; the engine cut it from .text only."""
    if text is None or not isinstance(stop, str):
        return text
    i = text.find(stop)
    return text if i < 0 else (text[:i] or None)


class _Server:
    def __init__(self, llm: AsyncLLM, names: list[str], log_requests: bool, max_request_bytes: int,
                 model_root: str | None):
        self.llm, self.names, self.log_requests = llm, names, log_requests
        self.max_request_bytes = max_request_bytes
        self.model_root = model_root
        self.metrics = Metrics()
        self.created = P.now()
        self._warned: set[str] = set()

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    # --- request checks ---------------------------------------------------------------------------
    async def body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = RequestError(f"the request body is larger than {limit} bytes (the server's "
                               f"--max-request-bytes)", status=413, code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"the request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                               f"{e.start}); send JSON encoded as UTF-8", code="invalid_utf8") from None
        return bytes(body)

    def model_name(self, req) -> str:
        if req.model is None:
            return self.names[0]
        if req.model not in self.names:
            raise RequestError(f"The model `{req.model}` does not exist. Served: {self.names}", "model",
                               status=404, code="model_not_found")
        return req.model

    def warn_ignored(self, req) -> None:
        # field names are client input: remember (and log) a bounded number, each cut short
        if len(self._warned) >= _MAX_WARNED_FIELDS:
            return
        new = [f[:64] for f in req.ignored_fields() if f[:64] not in self._warned]
        if new:
            new = new[:_MAX_WARNED_FIELDS - len(self._warned)]
            self._warned.update(new)
            log.warning("ignoring unsupported request field(s) %s", new)

    def sampling(self, req, max_tokens, logprobs, json_schema=None) -> SamplingParams:
        try:
            return SamplingParams(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, json_schema=json_schema)
        except SamplingParamsError as e:
            raise RequestError(str(e), P.param_of(str(e), req)) from None

    def fit(self, sp: SamplingParams, n_prompt: int, asked: tuple[str, int | None], what: str) -> SamplingParams:
        """max_tokens that fits the context; a prompt or max_tokens that does not is a 400."""
        name, value = asked
        max_len = self.max_model_len
        if n_prompt >= max_len:
            raise RequestError(f"the {what} take {n_prompt} tokens, but max_model_len is {max_len}: no room "
                               f"is left to generate (prompt + output must fit in {max_len} tokens)",
                               what, code="context_length_exceeded")
        room = max_len - n_prompt
        if value is None:
            try:
                return sp.clone(max_tokens=room)
            except SamplingParamsError as e:
                raise RequestError(f"{e} (the {what} leave room for {room} tokens)", "min_tokens") from None
        if value > room:
            raise RequestError(f"This model's maximum context length is {max_len} tokens. However, you "
                               f"requested {n_prompt + value} tokens ({n_prompt} in the {what}, {value} in "
                               f"the completion). Reduce the {what} or {name} (at most {room} here).",
                               name, code="context_length_exceeded")
        return sp

    async def first_output(self, request: Request, agen, param: str):
        async def first():
            return await agen.__anext__()

        try:
            return await _unless_disconnected(request, first())
        except QueueFullError as e:
            raise RequestError(f"the server is busy: {e}; retry later", status=503, code="queue_full",
                               type="server_error") from None
        except EngineDeadError as e:
            raise RequestError(str(e), status=503, code="engine_dead", type="server_error") from None
        except ValueError as e:  # the engine refused the prompt (vocabulary, KV capacity)
            raise RequestError(str(e), param) from None

    def log_request(self, rid: str, n_prompt: int, sp: SamplingParams, payload) -> None:
        if self.log_requests:
            log.info("%s: %d prompt tokens, %s, input %s", rid, n_prompt, sp, payload)
        else:
            log.debug("%s: %d prompt tokens, max_tokens=%s, n=%d", rid, n_prompt, sp.max_tokens, sp.n)

    # --- chat -------------------------------------------------------------------------------------
    async def chat(self, request: Request):
        t0 = time.monotonic()
        req = P.parse_request(P.ChatCompletionRequest, await self.body(request))
        model = self.model_name(req)
        self.warn_ignored(req)
        name, asked = req.requested_max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        try:
            # without max_tokens the room is known only after rendering; until then the context bounds
            # it (prepare_chat sizes a constrained request's reasoning budget from it)
            sp = self.sampling(req, self.max_model_len if asked is None else asked, top, req.json_schema())
        except RequestError as e:
            if name != "max_tokens" and e.param == "max_tokens":
                e.param, e.message = name, e.message.replace("max_tokens", name, 1)
                e.args = (e.message,)
            raise
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            ids, sp = await asyncio.to_thread(prepare_chat, messages, sp, tools, req.tool_choice or "auto",
                                              req.reasoning_effort or "medium")
        except (ValueError, TypeError) as e:
            param = P.param_of(str(e), req)
            if param is None and isinstance(e, _grammar_errors()):  # a schema xgrammar cannot compile
                param = ("response_format" if req.response_format and not req.tools else
                         "tools" if req.tools and not req.response_format else None)
            raise RequestError(str(e), param) from None
        sp = self.fit(sp, len(ids), (name, asked), "messages")
        rid = P.new_id("chatcmpl")
        self.log_request(rid, len(ids), sp, messages)
        agen = self.llm.generate(ids, sp, rid)
        first = await self.first_output(request, agen, "messages")
        ctx = dict(rid=rid, model=model, created=P.now(), ids=ids, sp=sp, top=top, t0=t0, t1=time.monotonic())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSEResponse(self.chat_stream(first, agen, include_usage, **ctx))
        last = await _unless_disconnected(request, self._last(first, agen))
        return JSONResponse(self.chat_response(last, **ctx))

    @staticmethod
    async def _last(out, agen):
        async for out in agen:
            pass
        return out

    def chat_response(self, out, rid, model, created, ids, sp, top, t0, t1) -> dict:
        choices, reasons, n_gen = [], [], 0
        for c in out.outputs:
            co = chat_output(c, ids)
            content = _cut_stop(co.content, c.stop_reason)
            reasoning = _cut_stop(co.reasoning, c.stop_reason) if content == co.content else co.reasoning
            choices.append({
                "index": c.index, "message": P.chat_message(reasoning, content, co.tool_calls),
                "logprobs": ({"content": P.chat_logprobs(c.token_ids, c.logprobs or [], top)}
                             if top is not None else None),
                "finish_reason": co.finish_reason})
            reasons.append(co.finish_reason)
            n_gen += len(c.token_ids)
        self.metrics.request_done(len(ids), n_gen, reasons, t0, t1)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": P.usage(len(ids), n_gen, out.num_cached_tokens)}

    async def chat_stream(self, out, agen, include_usage, rid, model, created, ids, sp, top, t0, t1):
        n = sp.n
        parsers = [StreamingParser() for _ in range(n)]
        seen, done, reasons = [0] * n, [False] * n, [None] * n
        pending_lp: list[list] = [[] for _ in range(n)]

        def chunk(i, delta, finish=None):
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            if top is not None:
                choice["logprobs"] = {"content": pending_lp[i]}
                pending_lp[i] = []
            return _sse(P.chat_chunk(rid, created, model, [choice], include_usage))

        completed = False
        try:
            for i in range(n):
                role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
                yield _sse(P.chat_chunk(rid, created, model, [role], include_usage))
            while True:
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    new = c.token_ids[seen[i]:]
                    if top is not None and new:
                        pending_lp[i] += P.chat_logprobs(new, (c.logprobs or [])[seen[i]:len(c.token_ids)], top)
                    seen[i] = len(c.token_ids)
                    deltas = [d for t in new for d in parsers[i].feed(t)]
                    if c.finished:
                        deltas += parsers[i].finish()
                        deltas = self._cut_stop_deltas(deltas, c.stop_reason)
                    for d in _merge_text(deltas):
                        yield chunk(i, self._delta(d))
                    if c.finished:
                        done[i] = True
                        reasons[i] = "tool_calls" if (parsers[i].result().tool_calls and c.finish_reason != "abort") \
                            else c.finish_reason
                        yield chunk(i, {}, reasons[i])
                if out.finished:
                    break
                out = await agen.__anext__()
            n_gen = sum(len(c.token_ids) for c in out.outputs)
            self.metrics.request_done(len(ids), n_gen, reasons, t0, t1)
            completed = True
            if include_usage:
                final = P.chat_chunk(rid, created, model, [], False)
                final["usage"] = P.usage(len(ids), n_gen, out.num_cached_tokens)
                yield _sse(final)
        except (EngineDeadError, ValueError) as e:
            completed = True
            self.metrics.errors[500] += 1
            yield _sse(P.error_body(str(e), "server_error", None, "engine_error"))
        finally:
            if not completed:  # the client left mid-stream: its unfinished choices were aborted
                self.metrics.finished["abort"] += done.count(False)
            await agen.aclose()
        yield "data: [DONE]\n\n"

    @staticmethod
    def _delta(d) -> dict:
        if isinstance(d, ReasoningDelta):
            return {"reasoning_content": d.text}
        if isinstance(d, ContentDelta):
            return {"content": d.text}
        if isinstance(d, ToolCallStart):
            return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                    "function": {"name": d.name, "arguments": ""}}]}
        assert isinstance(d, ToolCallArguments)
        return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}

    @staticmethod
    def _cut_stop_deltas(deltas, stop) -> list:
        if not isinstance(stop, str):
            return deltas
        for k, d in enumerate(deltas):
            if isinstance(d, (ReasoningDelta, ContentDelta)) and stop in d.text:
                head = d.text[:d.text.find(stop)]
                return deltas[:k] + ([type(d)(head)] if head else [])
        return deltas

    # --- completions ------------------------------------------------------------------------------
    async def completions(self, request: Request):
        t0 = time.monotonic()
        req = P.parse_request(P.CompletionRequest, await self.body(request))
        model = self.model_name(req)
        self.warn_ignored(req)
        sp = self.sampling(req, req.max_tokens, req.logprobs)
        prompts = []
        given = req.prompts()
        for k, p in enumerate(given):
            ids = await asyncio.to_thread(encode, p) if isinstance(p, str) else list(p)
            if not ids:
                raise RequestError(f"prompt{'' if len(given) == 1 else f'[{k}]'} is empty", "prompt")
            psp = self.fit(sp, len(ids), ("max_tokens", req.max_tokens), "prompt")
            prompts.append((p if isinstance(p, str) else None, ids, psp))
        rid = P.new_id("cmpl")
        agens, firsts = [], []
        try:
            for k, (text, ids, psp) in enumerate(prompts):
                self.log_request(f"{rid}-{k}", len(ids), psp, text if text is not None else ids)
                agens.append(self.llm.generate(ids, psp, f"{rid}-{k}", prompt=text))
                firsts.append(await self.first_output(request, agens[-1], "prompt"))
        except BaseException:
            for g in agens:
                await g.aclose()
            raise
        ctx = dict(rid=rid, model=model, created=P.now(), n=sp.n, echo=req.echo, top=req.logprobs, t0=t0,
                   t1=time.monotonic(), stop=sp.stop)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSEResponse(self.completion_stream(prompts, firsts, agens, include_usage, **ctx))

        async def collect():
            return await asyncio.gather(*(self._last(f, g) for f, g in zip(firsts, agens)))

        try:
            lasts = await _unless_disconnected(request, collect())
        finally:
            for g in agens:
                await g.aclose()
        return JSONResponse(self.completion_response(prompts, lasts, **ctx))

    @staticmethod
    def _prompt_text(text, ids) -> str:
        return text if text is not None else harmony_decode(ids)

    def completion_response(self, prompts, lasts, rid, model, created, n, echo, top, t0, t1, stop) -> dict:
        choices, reasons, n_prompt, n_gen, cached = [], [], 0, 0, 0
        for k, ((text, ids, _), out) in enumerate(zip(prompts, lasts)):
            head = self._prompt_text(text, ids) if echo else ""
            for c in out.outputs:
                choices.append({"index": k * n + c.index, "text": head + c.text,
                                "logprobs": (P.completion_logprobs(c.token_ids, c.logprobs or [], top)
                                             if top is not None else None),
                                "finish_reason": c.finish_reason})
                reasons.append(c.finish_reason)
                n_gen += len(c.token_ids)
            n_prompt += len(ids)
            cached += out.num_cached_tokens
        self.metrics.request_done(n_prompt, n_gen, reasons, t0, t1)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": P.usage(n_prompt, n_gen, cached)}

    async def completion_stream(self, prompts, firsts, agens, include_usage, rid, model, created, n, echo, top,
                                t0, t1, stop):
        hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        sent: dict[int, int] = {}
        n_tok: dict[int, int] = {}
        reasons = []
        lasts = list(firsts)
        merged = _merge(firsts, agens)

        def chunk(index, text, logprobs=None, finish=None):
            c = P.chat_chunk(rid, created, model, [{"index": index, "text": text, "logprobs": logprobs,
                                                    "finish_reason": finish}], include_usage)
            c["object"] = "text_completion"
            return _sse(c)

        completed = False
        try:
            if echo:
                for k, (text, ids, _) in enumerate(prompts):
                    for i in range(n):
                        yield chunk(k * n + i, self._prompt_text(text, ids))
            async for k, out in merged:
                lasts[k] = out
                for c in out.outputs:
                    idx = k * n + c.index
                    if n_tok.get(idx, 0) < 0:
                        continue  # finished already
                    upto = len(c.text) if c.finished else max(len(c.text) - hold, 0)
                    new = c.text[sent.get(idx, 0):upto]
                    toks = c.token_ids[n_tok.get(idx, 0):]
                    lp = None
                    if top is not None and toks:
                        offset = sent.get(idx, 0)
                        lp = P.completion_logprobs(toks, (c.logprobs or [])[n_tok.get(idx, 0):len(c.token_ids)],
                                                   top, offset)
                    if new or lp:
                        yield chunk(idx, new, lp)
                    sent[idx] = max(sent.get(idx, 0), upto)
                    n_tok[idx] = len(c.token_ids)
                    if c.finished:
                        n_tok[idx] = -1
                        reasons.append(c.finish_reason)
                        yield chunk(idx, "", None, c.finish_reason)
            n_prompt = sum(len(ids) for _, ids, _ in prompts)
            n_gen = sum(len(c.token_ids) for out in lasts for c in out.outputs)
            self.metrics.request_done(n_prompt, n_gen, reasons, t0, t1)
            completed = True
            if include_usage:
                final = P.chat_chunk(rid, created, model, [], False)
                final["object"] = "text_completion"
                final["usage"] = P.usage(n_prompt, n_gen, sum(o.num_cached_tokens for o in lasts))
                yield _sse(final)
        except (EngineDeadError, ValueError) as e:
            completed = True
            self.metrics.errors[500] += 1
            yield _sse(P.error_body(str(e), "server_error", None, "engine_error"))
        finally:
            if not completed:  # the client left mid-stream: its unfinished choices were aborted
                self.metrics.finished["abort"] += len(prompts) * n - len(reasons)
            await merged.aclose()  # stops its pumps before the streams they read are closed
            for g in agens:
                await g.aclose()
        yield "data: [DONE]\n\n"


async def _merge(firsts, agens) -> AsyncIterator:
    """(k, output) from several request streams as they arrive; the first outputs come first."""
    queue: asyncio.Queue = asyncio.Queue()
    live = [k for k, f in enumerate(firsts) if not f.finished]
    for k, f in enumerate(firsts):
        yield k, f

    async def pump(k):
        try:
            async for out in agens[k]:
                await queue.put((k, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((k, e))
        await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k)) for k in live]
    try:
        remaining = len(tasks)
        while remaining:
            k, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the app ----------------------------------------------------------------------------------------

def build_app(async_llm: AsyncLLM, served_model_name: str | list[str], api_key: str | None = None, *,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_origins: list[str] | None = None,
              log_requests: bool = False, model_root: str | None = None,
              max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> FastAPI:
    """The FastAPI app serving `async_llm` under `served_model_name` (one name or several).

    api_key: when set, every /v1/* route needs `Authorization: Bearer KEY` (compared in constant
    time); /health and /metrics stay open. allowed_origins: enables CORS for those origins (off by
    default). log_requests: log prompts and parameters (off by default: prompts are user data).
    max_request_bytes / max_header_bytes: larger bodies get 413, larger headers 431.
    """
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"served_model_name must be a non-empty name or list of names, got {served_model_name!r}")
    for name, v in (("max_request_bytes", max_request_bytes), ("max_header_bytes", max_header_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    srv = _Server(async_llm, names, log_requests, max_request_bytes, model_root)
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def check_api_key(request: Request) -> None:
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # hash both sides so the comparison is constant-time in the key's length too
        given = hashlib.sha256(token.strip().encode()).digest()
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key_digest)):
            raise RequestError("missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                               status=401, code="invalid_api_key")

    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    # added last, so it runs first: oversized heads never reach CORS or a route
    app.add_middleware(_HeaderLimit, max_header_bytes=max_header_bytes, metrics=srv.metrics)
    app.state.max_header_bytes = max_header_bytes

    def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
        srv.metrics.errors[status] += 1
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if code == "queue_full":  # a full queue drains within seconds; say when to try again
            headers = {"Retry-After": "1"}
        return JSONResponse(P.error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, e.message)
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, e: _ClientGone):
        srv.metrics.finished["abort"] += 1
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, msg, "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await srv.chat(request)

    @v1.post("/completions")
    async def completions(request: Request):
        return await srv.completions(request)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": srv.created, "owned_by": "gptoss",
                "root": srv.model_root or name, "max_model_len": srv.max_model_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in names:
            raise RequestError(f"The model `{model_id}` does not exist. Served: {names}", "model", status=404,
                               code="model_not_found")
        return model_card(model_id)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if async_llm.is_running:
            return {"status": "ok"}
        return error_response(503, f"the engine is not running ({async_llm.error!r})", "server_error",
                              code="engine_dead")

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.to_thread(async_llm.stats)  # waits for the engine lock, off the event loop
        return PlainTextResponse(srv.metrics.render(stats, names[0], async_llm.is_running),
                                 media_type="text/plain; version=0.0.4")

    return app


# --- running it -------------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    log_level: str = "warning") -> Iterator[str]:
    """Serve `app` from a background thread (port 0: a free one); yields the base URL. For tests and
    notebooks; the server stops when the block exits."""
    import uvicorn
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptoss-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        h = f"[{host}]" if ":" in host else host
        yield f"http://{h}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | list[str] | None = None, max_queued_requests: int | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_origins: list[str] | None = None,
               log_requests: bool = False, log_level: str = "info",
               max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, **engine_kwargs) -> None:
    """Load `model`, start the engine and serve the OpenAI API until interrupted (Ctrl-C / SIGTERM)."""
    import sys

    import uvicorn

    from ..llm import LLM
    if max_queued_requests is not None and (isinstance(max_queued_requests, bool) or
                                            not isinstance(max_queued_requests, int) or max_queued_requests < 1):
        raise ValueError(f"max_queued_requests={max_queued_requests!r} must be an integer >= 1")
    try:  # claim the port before a long model load
        sock = _bind(host, port)
    except OSError as e:
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    print(f"gptoss serve: loading {model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        eng = LLM(model, progress=True, **engine_kwargs).engine
    except BaseException:
        sock.close()
        raise
    print(f"gptoss serve: loaded in {time.perf_counter() - t0:.1f}s on {eng.device} "
          f"(moe_backend={eng.moe_backend}, max_model_len={eng.max_model_len})", file=sys.stderr, flush=True)
    async_llm = AsyncLLM(eng, max_queued_requests=max_queued_requests)
    try:
        app = build_app(async_llm, served_model_name or [model], api_key, max_request_bytes=max_request_bytes,
                        allowed_origins=allowed_origins, log_requests=log_requests, model_root=model,
                        max_header_bytes=max_header_bytes)
        h = f"[{host}]" if ":" in host else host
        print(f"gptoss serve: model {app.state.server.names} at http://{h}:{sock.getsockname()[1]}/v1"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
        uvicorn.Server(_uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=10)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        print("gptoss serve: stopped", file=sys.stderr, flush=True)
    finally:
        async_llm.shutdown()
        sock.close()
