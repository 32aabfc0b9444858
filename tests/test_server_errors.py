"""Bad requests get a 4xx with the OpenAI error body naming what is wrong, and the server keeps
serving. One real server on 127.0.0.1 for the module, driven with httpx."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

from gptoss import LLM  # noqa: E402
from gptoss.engine.async_engine import AsyncLLM  # noqa: E402
from gptoss.serve import build_app, serve_in_thread  # noqa: E402

MODEL = "gpt-oss-tiny"
MAX_MODEL_LEN = 1024
MAX_BODY = 64 * 1024
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, progress=False)
    engine = AsyncLLM(llm.engine, max_queued_requests=64)
    app = build_app(engine, MODEL, max_request_bytes=MAX_BODY)
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield SimpleNamespace(url=url, http=http, engine=engine)
    engine.shutdown()


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **kw}


def drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (what, path, body: dict (sent as JSON) or bytes (sent raw), status, param, a fragment of the message)
BAD = [
    ("malformed JSON", CHAT, b'{"model": "gpt-oss-tiny", "messages": [', 400, None, "not valid JSON"),
    ("body is a JSON array", CHAT, b"[1, 2]", 400, None, "must be a JSON object"),
    ("empty body", CHAT, b"", 400, None, "not valid JSON"),
    ("messages missing", CHAT, drop(chat(), "messages"), 400, "messages", "field required"),
    ("messages empty", CHAT, chat(messages=[]), 400, "messages", "at least 1 item"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages", "valid array"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role",
     "'user'"),
    ("content of a wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", "string"),
    ("user message without content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content",
     "missing"),
    ("image content part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                                                 "image_url": {"url": "x"}}]}]),
     400, "messages[0].content[0]", "only text parts"),
    ("tool result for an unknown call", CHAT, chat(messages=USER + [{"role": "tool", "tool_call_id": "nope",
                                                                     "content": "1"}]),
     400, "messages[1].tool_call_id", "matches no earlier assistant tool call"),
    ("unknown model", CHAT, chat(model="gpt-5"), 404, "model", "does not exist"),
    ("model of a wrong type", CHAT, chat(model=3), 400, "model", "valid string"),
    ("temperature < 0", CHAT, chat(temperature=-0.5), 400, "temperature", ">= 0"),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, "temperature", "valid number"),
    ("top_p = 0", CHAT, chat(top_p=0), 400, "top_p", "(0, 1]"),
    ("top_p > 1", CHAT, chat(top_p=1.5), 400, "top_p", "(0, 1]"),
    ("top_k = 0", CHAT, chat(top_k=0), 400, "top_k", "-1 (off)"),
    ("n = 0", CHAT, chat(n=0), 400, "n", "[1, 128]"),
    ("n too large", CHAT, chat(n=1000), 400, "n", "[1, 128]"),
    ("n a boolean", CHAT, chat(n=True), 400, "n", "valid integer"),
    ("max_tokens = 0", CHAT, chat(max_tokens=0), 400, "max_tokens", ">= 1"),
    ("max_tokens < 0", CHAT, chat(max_tokens=-3), 400, "max_tokens", ">= 1"),
    ("max_tokens beyond the context", CHAT, chat(max_tokens=5000), 400, "max_tokens",
     "maximum context length is 1024"),
    ("max_completion_tokens = 0", CHAT, drop(chat(max_completion_tokens=0), "max_tokens"), 400,
     "max_completion_tokens", ">= 1"),
    ("prompt longer than max_model_len", CHAT, chat(messages=[{"role": "user", "content": "hello " * 1100}]),
     400, "messages", "max_model_len is 1024"),
    ("presence_penalty out of range", CHAT, chat(presence_penalty=3), 400, "presence_penalty", "[-2, 2]"),
    ("seed not an integer", CHAT, chat(seed=1.5), 400, "seed", "valid integer"),
    ("stream not a boolean", CHAT, chat(stream="yes"), 400, "stream", "valid boolean"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options", "only allowed when stream is true"),
    ("stop of a wrong type", CHAT, chat(stop=5), 400, "stop", "string or a list of strings"),
    ("empty stop string", CHAT, chat(stop=[""]), 400, "stop", "non-empty"),
    ("too many stop strings", CHAT, chat(stop=[f"s{i}" for i in range(100)]), 400, "stop", "at most 64"),
    ("logprobs not a boolean", CHAT, chat(logprobs=3), 400, "logprobs", "valid boolean"),
    ("top_logprobs too large", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "[0, 20]"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "needs logprobs=true"),
    ("logit_bias", CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias", "not supported"),
    ("reasoning_effort unknown", CHAT, chat(reasoning_effort="extreme"), 400, "reasoning_effort",
     "'low', 'medium' or 'high'"),
    ("tool_choice names an unknown tool", CHAT,
     chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "send_email"}}), 400,
     "tool_choice", "'send_email', which is not among the tools ['get_weather']"),
    ("tool_choice required without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice",
     "at least one tool"),
    ("tool_choice an unknown word", CHAT, chat(tools=[TOOL], tool_choice="sometimes"), 400, "tool_choice",
     "'auto', 'none', 'required'"),
    ("tool without a function", CHAT, chat(tools=[{"type": "function"}]), 400, "tools[0].function",
     "field required"),
    ("tool of another type", CHAT, chat(tools=[{"type": "retrieval", "function": TOOL["function"]}]), 400,
     "tools[0].type", "'function'"),
    ("tool name with spaces", CHAT, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     400, "tools[0].function.name", "pattern"),
    ("tool defined twice", CHAT, chat(tools=[TOOL, TOOL]), 400, "tools[1].function.name", "defined twice"),
    ("tool parameters not an object", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), 400,
     "tools[0].function.parameters", "an object"),
    ("response_format of an unknown type", CHAT, chat(response_format={"type": "xml"}), 400,
     "response_format.type", "'json_schema'"),
    ("json_schema without a schema", CHAT, chat(response_format={"type": "json_schema",
                                                                  "json_schema": {"name": "x"}}),
     400, "response_format", "needs json_schema.schema"),
    ("json_schema schema not an object", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "yes"}}), 400,
     "response_format.json_schema.schema", "an object"),
    ("json_schema that cannot compile", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "object", "properties": 5}}}), 400, "response_format", "properties must be an object"),
    # completions
    ("completion without a prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", "field required"),
    ("completion prompt of a wrong type", COMPLETIONS, {"model": MODEL, "prompt": 5}, 400, "prompt",
     "a string, a list of strings"),
    ("completion prompt empty", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    ("completion token outside the vocabulary", COMPLETIONS, {"model": MODEL, "prompt": [1, 10 ** 9]}, 400,
     "prompt", "outside the vocabulary"),
    ("completion max_tokens beyond the context", COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 2000},
     400, "max_tokens", "maximum context length"),
    ("completion logprobs too large", COMPLETIONS, {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400,
     "logprobs", "[0, 20]"),
    ("completion suffix", COMPLETIONS, {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix",
     "not supported"),
    ("completion best_of", COMPLETIONS, {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of",
     "not supported"),
    ("completion echo with logprobs", COMPLETIONS, {"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1},
     400, "echo", "prompt logprobs"),
]


def _check_error(r, status, param=None, fragment=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["code"] is None or isinstance(err["code"], (str, int))
    assert err["param"] == param, err
    if fragment is not None:
        assert fragment in err["message"], err["message"]
    return err


@pytest.mark.parametrize("what,path,body,status,param,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, what, path, body, status, param, fragment):
    if isinstance(body, bytes):
        r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.http.post(path, json=body)
    err = _check_error(r, status, param, fragment)
    assert err["type"] == "invalid_request_error"


def test_error_codes(server):
    err = _check_error(server.http.post(CHAT, json=chat(max_tokens=5000)), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    err = _check_error(server.http.post(CHAT, json=chat(model="nope")), 404, "model")
    assert err["code"] == "model_not_found"
    err = _check_error(server.http.post(CHAT, content=b"{"), 400)
    assert err["code"] == "invalid_json"


def test_body_too_large_is_413(server):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])).encode()
    err = _check_error(server.http.post(CHAT, content=big), 413)
    assert err["code"] == "request_too_large" and str(MAX_BODY) in err["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    _check_error(server.http.post(CHAT, content=chunks()), 413)


def test_routes_and_methods(server):
    _check_error(server.http.post("/v1/nope", json={}), 404)
    _check_error(server.http.get(CHAT), 405)
    err = _check_error(server.http.get("/v1/models/gpt-5"), 404, "model")
    assert err["code"] == "model_not_found"
    assert server.http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_no_cors_unless_asked(server):
    r = server.http.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = server.http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_still_serving_after_bad_requests(server):
    for _, path, body, *_ in BAD[:10]:
        server.http.post(path, content=body) if isinstance(body, bytes) else server.http.post(path, json=body)
    r = server.http.post(CHAT, json=chat(max_tokens=3))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.http.get("/health").status_code == 200
    assert server.engine.is_running and not server.engine.engine.has_unfinished()
    metrics = server.http.get("/metrics").text
    assert 'gptoss:request_errors_total{model_name="gpt-oss-tiny",status="400"}' in metrics


class _DeadEngine:
    """What an AsyncLLM whose engine thread failed looks like from the outside."""
    is_running = False
    error = RuntimeError("CUDA error: device-side assert triggered")
    max_queued_requests = None

    class engine:
        max_model_len = 1024

    def stats(self):
        return {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0}

    async def generate(self, *a, **kw):
        from gptoss.engine.async_engine import EngineDeadError
        raise EngineDeadError(f"the engine is not running ({self.error!r})")
        yield  # an async generator, as AsyncLLM.generate is


def test_dead_engine_is_503():
    from fastapi.testclient import TestClient
    with TestClient(build_app(_DeadEngine(), MODEL, allowed_origins=["http://localhost:3000"])) as c:
        err = _check_error(c.get("/health"), 503)
        assert err["code"] == "engine_dead" and "device-side assert" in err["message"]
        err = _check_error(c.post(CHAT, json=chat()), 503)
        assert err["type"] == "server_error"
        assert "gptoss:engine_running{" in c.get("/metrics").text
        # CORS when asked for: only the listed origin
        r = c.options(CHAT, headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
