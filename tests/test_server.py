"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on
127.0.0.1 serving the tiny random checkpoint (one server for the module). Also the `chat` and
`serve` commands and the examples."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

from gptoss import LLM, SamplingParams  # noqa: E402
from gptoss.engine.async_engine import AsyncLLM  # noqa: E402
from gptoss.serve import build_app, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-oss-tiny"
API_KEY = "sk-test-0123456789"
MAX_MODEL_LEN = 1024
USER = [{"role": "user", "content": "What is the weather like in SF?"}]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the example's tools, so the server compiles each grammar once for the tests and the example
TOOLS = _example("openai_chat_client_function_calling").TOOLS
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, progress=False)
    engine = AsyncLLM(llm.engine, max_queued_requests=64)
    app = build_app(engine, MODEL, api_key=API_KEY, model_root=str(tiny_ckpt))
    with serve_in_thread(app) as url:
        yield SimpleNamespace(url=url, engine=engine, llm=llm)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def _idle(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.engine.has_unfinished():
            return True
        time.sleep(0.02)
    return False


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- basics ---------------------------------------------------------------------------------------

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "gptoss" and card.max_model_len == MAX_MODEL_LEN


def test_health_and_metrics(server, client):
    r = httpx.get(f"{server.url}/health")  # open without the key
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("gptoss:num_requests_running", "gptoss:num_requests_waiting", "gptoss:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text
        assert _metric(text, name) >= 0
    assert 0.0 <= _metric(text, "gptoss:kv_cache_usage_perc") <= 1.0
    assert _metric(text, "gptoss:generation_tokens_total") >= 4
    assert _metric(text, "gptoss:e2e_request_latency_seconds_count") >= 1


def test_api_key_required(server):
    url = f"{server.url}/v1"
    no_key = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        no_key.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": f"Bearer {API_KEY}x"}):
        r = httpx.post(f"{url}/chat/completions", json={"messages": USER}, headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/metrics").status_code == 200


# --- chat -----------------------------------------------------------------------------------------

def test_chat_matches_offline(client, tiny_llm):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ref = tiny_llm.chat(USER, SamplingParams(temperature=0, max_tokens=16))[0]
    assert choice.message.content == ref.content
    assert getattr(choice.message, "reasoning_content", None) == ref.reasoning
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


def _collect_stream(stream):
    chunks = list(stream)
    by_index: dict[int, dict] = {}
    for ch in chunks:
        for c in ch.choices:
            acc = by_index.setdefault(c.index, {"role": None, "content": "", "reasoning": "", "finish": None,
                                                "calls": {}, "logprobs": []})
            d = c.delta
            acc["role"] = acc["role"] or d.role
            acc["content"] += d.content or ""
            acc["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = acc["calls"].setdefault(tc.index, {"id": None, "name": None, "arguments": "", "parts": 0})
                if tc.id is not None:
                    assert call["id"] is None, "a call's id comes once, in its first delta"
                    call["id"], call["name"] = tc.id, tc.function.name
                    assert tc.type == "function" and tc.function.arguments == ""
                else:
                    call["arguments"] += tc.function.arguments
                    call["parts"] += 1
            if c.logprobs is not None and c.logprobs.content:
                acc["logprobs"] += c.logprobs.content
            if c.finish_reason is not None:
                assert acc["finish"] is None
                acc["finish"] = c.finish_reason
    return chunks, by_index


def test_chat_stream_matches_non_stream(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0]
    chunks, got = _collect_stream(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    g = got[0]
    assert g["content"] == (full.message.content or "")
    assert g["reasoning"] == (getattr(full.message, "reasoning_content", None) or "")
    assert g["finish"] == full.finish_reason
    # include_usage: the last chunk has no choices and the usage; the others carry usage null
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 24
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_without_usage_and_done_marker(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_n2_streamed_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, n=2, seed=5, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 16  # summed over the n choices
    _, got = _collect_stream(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, n=2,
                                                            seed=5, temperature=1.0, stream=True))
    assert sorted(got) == [0, 1] and all(g["role"] == "assistant" and g["finish"] for g in got.values())
    for i in (0, 1):  # the same seed gives the same samples, streamed or not
        assert got[i]["content"] == (r.choices[i].message.content or "")


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(**kw, seed=1234)
    b = client.chat.completions.create(**kw, seed=1234)
    c = client.chat.completions.create(**kw, seed=4321)
    text = [(x.choices[0].message.content, getattr(x.choices[0].message, "reasoning_content", None))
            for x in (a, b, c)]
    assert text[0] == text[1]
    assert text[0] != text[2]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        # greedy: the sampled token is the most likely one
        assert item.token == item.top_logprobs[0].token and item.logprob == pytest.approx(lps[0])
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    _, got = _collect_stream(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6,
                                                            temperature=0, logprobs=True, top_logprobs=3,
                                                            stream=True))
    assert [x.token for x in got[0]["logprobs"]] == [x.token for x in content]


def test_stop_string(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=16, temperature=0)
    text = client.chat.completions.create(**kw).choices[0].message.content
    assert text and len(text) > 12
    stop = text[6:10]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert (r.choices[0].message.content or "") == text[:text.find(stop)]


# --- tools and structured output -----------------------------------------------------------------
# These need the sampler to apply SamplingParams.structured (the grammar prepare_chat compiles).

def _assert_call(call, names=TOOL_NAMES):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    required = fn["parameters"]["required"]
    assert isinstance(args, dict) and set(required) <= set(args)
    return args


def test_required_tool_call_then_tool_result(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=128, reasoning_effort="low")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    _assert_call(choice.message.tool_calls[0])
    # the follow-up turn: the assistant message as returned, then the tool's result
    call = choice.message.tool_calls[0]
    follow = USER + [choice.message, {"role": "tool", "tool_call_id": call.id,
                                      "content": json.dumps({"temperature": 20, "unit": "celsius"})}]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=16,
                                        reasoning_effort="low")
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_named_tool_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=128, reasoning_effort="low",
        tool_choice={"type": "function", "function": {"name": "get_multiple_weathers"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_multiple_weathers"]
    _assert_call(r.choices[0].message.tool_calls[0])


def test_streamed_tool_call(client):
    _, got = _collect_stream(client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=128, reasoning_effort="low",
        stream=True))
    g = got[0]
    assert g["finish"] == "tool_calls" and g["calls"]
    call = g["calls"][0]
    assert call["id"].startswith("call_") and call["name"] in TOOL_NAMES and call["parts"] >= 1
    assert isinstance(json.loads(call["arguments"]), dict)


def test_json_schema(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=96,
        reasoning_effort="low",
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    out = json.loads(choice.message.content)
    assert out["answer"] in ("yes", "no") and 0 <= out["confidence"] <= 9 and set(out) == {"answer", "confidence"}


# --- completions ----------------------------------------------------------------------------------

def test_completions(client, tiny_llm):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    ref = tiny_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert r.choices[0].text == ref[0].outputs[0].text
    assert r.usage.prompt_tokens == len(ref[0].prompt_token_ids)

    many = client.completions.create(model=MODEL, prompt=["a b c", [1, 2, 3, 4]], max_tokens=4, n=2, seed=1,
                                     logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for c in many.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)

    echo = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello there")


def test_completions_stream(client):
    kw = dict(model=MODEL, prompt=["one two", "three four"], max_tokens=6, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert text == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


# --- load and disconnects -------------------------------------------------------------------------

def test_client_disconnect_aborts(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        first = next(ln for ln in r.iter_lines() if ln)
        assert '"role": "assistant"' in first  # sent once the first token exists; then leave mid-stream
    assert _idle(server.engine), "a streaming request kept running after its client left"
    # the same for a non-streaming request whose client gives up
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=0.5)
    assert _idle(server.engine), "a request kept running after its client timed out"
    assert server.engine.stats()["kv_cache_usage_perc"] == 0.0, "an aborted request kept its KV blocks"


def test_queue_full_is_503(server, client):
    old = server.engine.max_queued_requests
    server.engine.max_queued_requests = 0  # every new request finds the queue full
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    finally:
        server.engine.max_queued_requests = old
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices


def test_concurrent_requests(server):
    import concurrent.futures as cf
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def one(i):
        return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                         max_tokens=6, temperature=0).usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as ex:
        assert all(n <= 6 for n in ex.map(one, range(8)))


# --- the examples and the commands ----------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_function_calling_example(server, capsys):
    example = _example("openai_chat_client_function_calling")
    rc = example.main(["--base-url", f"{server.url}/v1", "--api-key", API_KEY, "--tool-choice", "required",
                       "--max-tokens", "192", "--seed", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert out.out.startswith("[USER PROMPT] What is the weather like in SF?\n")
    assert "[RESPONSE 1] [FUNCTION CALL] get_" in out.out and "(**{" in out.out
    assert "\n[RESPONSE 2]" in out.out


def test_quickstart_example(tiny_ckpt, capsys):
    _example("quickstart").main(["--model", str(tiny_ckpt), "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert out.count("[OUTPUT]") == 2 and "[ANSWER]" in out and "[FINISH]" in out


def _run_chat(args, stdin, monkeypatch, capsys):
    from gptoss.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["chat", *args, "--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--seed", "0"])
    return rc, capsys.readouterr().out


def test_cli_chat(tiny_ckpt, monkeypatch, capsys):
    rc, out = _run_chat([str(tiny_ckpt), "--max-tokens", "6"], "hello\n/effort low\n/effort max\n/system be brief\n"
                        "again\n/reset\n/exit\n", monkeypatch, capsys)
    assert rc == 0
    assert "ready on cpu" in out and "(reasoning effort low)" in out and "(choose one of low, medium, high)" in out
    assert "(system message set)" in out and "(conversation cleared)" in out
    assert out.count("[stopped at --max-tokens]") == 2  # both messages got a reply


def test_cli_chat_tool_call(tiny_ckpt, monkeypatch, capsys, tmp_path):
    tools = tmp_path / "tools.json"
    city = {"type": "string", "enum": ["Paris", "Rome"]}
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {"city": city}}}}]))
    # the model must call the tool; the next line is its result; end of input ends the chat
    rc, out = _run_chat([str(tiny_ckpt), "--max-tokens", "48", "--tools", str(tools), "--tool-choice", "required"],
                        'weather in Paris?\n{"temperature": 20}\n', monkeypatch, capsys)
    assert rc == 0 and "1 tool)" in out
    assert "[tool call] get_weather({" in out and "result of get_weather>" in out


def test_cli_serve(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptoss", "serve", str(tiny_ckpt), "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                             "--served-model-name", "tiny", "--api-key", "k", "--log-level", "warning"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "loading" in out and f"http://127.0.0.1:{port}/v1" in out
