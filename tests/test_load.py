"""Load and disconnects over loopback against the tiny model on CPU: 256 concurrent streaming
clients, 30% of them leaving mid-stream. Every completed stream is whole, every abandoned request
is aborted in the engine, and afterwards nothing is running, waiting or holding KV blocks. A full
bounded queue answers 503 and costs the admitted requests nothing.

Bounded: completed streams ask for 8 tokens; the leavers ask for 512 (they could not finish in the
test's time unless aborted), and the whole run has a hard timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

from gptoss import LLM  # noqa: E402
from gptoss.engine.async_engine import AsyncLLM  # noqa: E402
from gptoss.serve import build_app, serve_in_thread  # noqa: E402

MODEL = "gpt-oss-tiny"
CLIENTS = 256
LEAVE_EVERY = (0, 1, 2)  # i % 10 in this: 30% of the clients disconnect mid-stream
MAX_TOKENS = 8
LEAVER_MAX_TOKENS = 512
HARD_TIMEOUT_S = 90
LEAVERS = sum(i % 10 in LEAVE_EVERY for i in range(CLIENTS))  # 78 of 256


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _sse_events(lines: list[str]) -> list:
    """The data lines of an SSE stream: parsed JSON chunks, and the final "[DONE]"."""
    events = []
    for ln in lines:
        assert ln.startswith("data: "), ln
        data = ln[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _check_whole_stream(events: list, obj: str) -> list:
    """What every complete stream has: one id and object, no error, a usage chunk with max_tokens,
    exactly one finish ("length": ignore_eos), then [DONE]. Returns the chunks."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert all("error" not in c for c in chunks), chunks
    rid = chunks[0]["id"]
    assert all(c["id"] == rid and c["object"] == obj for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    finishes = [ch["finish_reason"] for c in chunks[:-1] for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["length"], finishes  # ignore_eos: exactly max_tokens, then one finish
    return chunks


def _check_whole_chat_stream(events: list) -> str:
    """A complete chat stream: besides the above, a role chunk first and deltas of known fields."""
    chunks = _check_whole_stream(events, "chat.completion.chunk")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    for c in chunks[1:-2]:
        delta = c["choices"][0]["delta"]
        assert set(delta) <= {"content", "reasoning_content", "tool_calls"} and delta, delta
    return chunks[0]["id"]


def _check_whole_completion_stream(events: list) -> str:
    return _check_whole_stream(events, "text_completion")[0]["id"]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False,
              max_num_seqs=CLIENTS)
    engine = AsyncLLM(llm.engine, max_queued_requests=4 * CLIENTS)
    with serve_in_thread(build_app(engine, MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine, llm=llm)
    engine.shutdown()


async def _client(http, i: int) -> dict:
    leave = i % 10 in LEAVE_EVERY
    chat = i % 4 != 3  # a quarter use /v1/completions
    body = {"model": MODEL, "max_tokens": LEAVER_MAX_TOKENS if leave else MAX_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"hello number {i}"}]
    else:
        path, body["prompt"] = "/v1/completions", f"Once upon a time, number {i}"
    lines: list[str] = []
    async with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for ln in r.aiter_lines():
            if not ln:
                continue
            lines.append(ln)
            # leave once real output has arrived: the request is mid-generation
            if leave and len(lines) >= (3 if chat else 2):
                return {"i": i, "left": True, "id": json.loads(lines[0][6:])["id"]}
    events = _sse_events(lines)
    rid = _check_whole_chat_stream(events) if chat else _check_whole_completion_stream(events)
    return {"i": i, "left": False, "id": rid}


def test_256_streaming_clients_30_percent_leave(loaded, record_property):
    eng = loaded.llm.engine
    aborted: list[str] = []
    real_abort = eng.abort

    def recording_abort(ids):
        ids = list(ids)
        aborted.extend(ids)
        return real_abort(ids)

    eng.abort = recording_abort  # AsyncLLM calls it (under its lock) for requests still unfinished
    try:
        async def run():
            limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=CLIENTS + 8)
            async with httpx.AsyncClient(base_url=loaded.url, timeout=HARD_TIMEOUT_S, limits=limits) as http:
                return await asyncio.wait_for(asyncio.gather(*(_client(http, i) for i in range(CLIENTS))),
                                              HARD_TIMEOUT_S)

        t0 = time.monotonic()
        results = asyncio.run(run())
        wall = time.monotonic() - t0
        # the leavers' requests are aborted as their connections close; give the server a moment
        deadline = time.monotonic() + 20
        while eng.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        idle_after = time.monotonic() - t0
    finally:
        del eng.abort

    left = {r["id"] for r in results if r["left"]}
    done = {r["id"] for r in results if not r["left"]}
    assert len(left) == LEAVERS
    assert len(done) == CLIENTS - LEAVERS  # unique ids, every one whole (checked in _client)
    # every abandoned request was aborted in the engine, and no completed one was (a completions
    # request runs its k-th prompt as engine request "<id>-<k>")
    aborted_ids = {a.rsplit("-", 1)[0] if a.startswith("cmpl-") else a for a in aborted}
    assert left <= aborted_ids, f"not aborted: {sorted(left - aborted_ids)[:5]}"
    assert not done & aborted_ids
    assert not eng.has_unfinished() and not eng.scheduler.requests and eng.pool.all_free
    metrics = httpx.get(f"{loaded.url}/metrics").text
    assert _metric(metrics, "gptoss:num_requests_running") == 0
    assert _metric(metrics, "gptoss:num_requests_waiting") == 0
    assert _metric(metrics, "gptoss:kv_cache_usage_perc") == 0.0
    assert _metric(metrics, "gptoss:request_success_total", 'finished_reason="abort"') == LEAVERS
    assert _metric(metrics, "gptoss:request_success_total", 'finished_reason="length"') == CLIENTS - LEAVERS
    assert wall < HARD_TIMEOUT_S
    # the figures docs/reliability.md quotes (pytest -rA shows them with -s or in the junit XML)
    for k, v in (("clients", CLIENTS), ("completed", len(done)), ("aborted", len(left)),
                 ("wall_s", round(wall, 1)), ("idle_after_s", round(idle_after, 1)),
                 ("completed_per_s", round(len(done) / wall, 1))):
        record_property(k, v)
    print(f"\nload: {CLIENTS} clients, {len(done)} completed, {len(left)} aborted, {wall:.1f} s wall, "
          f"{len(done) / wall:.1f} completed streams/s, idle {idle_after:.1f} s after the start")


def test_full_queue_answers_503_and_the_admitted_finish(tiny_ckpt):
    """Two running, at most three waiting: of 16 simultaneous requests the surplus gets 503 at once
    (with Retry-After), the admitted ones finish whole, and nothing is left behind."""
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False, max_num_seqs=2)
    engine = AsyncLLM(llm.engine, max_queued_requests=3)
    try:
        with serve_in_thread(build_app(engine, MODEL)) as url:
            async def one(http, i):
                body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": 200, "ignore_eos": True}
                return await http.post("/v1/completions", json=body)

            async def run():
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(16))), 60)

            responses = asyncio.run(run())
            ok = [r for r in responses if r.status_code == 200]
            busy = [r for r in responses if r.status_code == 503]
            assert len(ok) + len(busy) == 16, [r.status_code for r in responses]
            assert len(ok) >= 2 and len(busy) >= 1
            assert len(ok) <= 2 + 3 + 8  # far fewer than all: the queue bound held under the burst
            for r in busy:
                err = r.json()["error"]
                assert err["code"] == "queue_full" and "max_queued_requests=3" in err["message"]
                assert r.headers["retry-after"] == "1"
            for r in ok:
                c = r.json()["choices"][0]
                assert c["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 200
            metrics = httpx.get(f"{url}/metrics").text
            assert _metric(metrics, "gptoss:request_errors_total", 'status="503"') == len(busy)
            # a request that asks for more samples than the queue can ever hold is refused the same way
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 4, "max_tokens": 1})
            assert r.status_code == 503 and "adds 4" in r.json()["error"]["message"]
            assert not llm.engine.has_unfinished() and llm.engine.pool.all_free
    finally:
        engine.shutdown()
