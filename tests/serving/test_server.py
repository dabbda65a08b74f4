"""The HTTP server, end to end: a real uvicorn server on 127.0.0.1 over a tiny random-weight
MoE and a tiny SentencePiece tokenizer, driven by the official `openai` client.

Random weights never write `<think>`, so the engine here is a real `Engine` whose sampled token
is replaced by a fixed script for requests with seed `SCRIPT_SEED`: the model, cache, slots,
worker thread, detokeniser, reasoning splitter and SSE path all run as in production."""

import asyncio
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from r1jax.config import load_model
from r1jax.data.tokenizer import render_chat, train_sentencepiece
from r1jax.sampling.engine import Engine
from r1jax.serving.app import create_app
from r1jax.serving.reasoning import ReasoningSplitter, split_reasoning
from tests.sampling import materialise
from tests.serving.loopback import serving

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test"
MODEL = "tiny-r1"
SCRIPT_SEED = 4242
SCRIPT = "<think>\nLet me add 2 and 2: that is 4.\n</think>\n\nThe answer is 4."
MAX_LEN = 128
CORPUS = ("<think>\nFirst add the ones, then carry the tens.\n</think>\n\nThe answer is {n}.\n"
          "User: what is {a} plus {b}? Assistant: <think> {a} + {b} = {n} </think> <answer>{n}</answer>\n")


class ScriptedEngine(Engine):
    """An Engine that emits SCRIPT (then eos) instead of its samples for seed SCRIPT_SEED."""

    script: list[int] = []

    def _emit(self, slot, token, logprob, events):
        req = self.running[slot]
        if req.sampling.seed == SCRIPT_SEED:
            k = len(req.token_ids)
            token = self.script[k] if k < len(self.script) else self.script[-1]
        super()._emit(slot, token, logprob, events)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(CORPUS.format(a=a, b=b, n=a + b) for a in range(12) for b in range(7)))
    tok = train_sentencepiece([corpus], 320, tmp / "tok")
    cfg = load_model("configs/model/tiny-moe.yaml", "num_hidden_layers=2", f"vocab_size={tok.vocab_size}")
    engine = ScriptedEngine(materialise(cfg), slots=8, max_len=MAX_LEN)
    engine.script = tok.encode(SCRIPT) + [tok.eos_id]
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY)
    with serving(app) as port:
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "port": port, "tok": tok, "engine": engine, "worker": app.state.worker,
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)}


def _http(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    """(status, headers, body text) of one plain HTTP request (the openai client is too polite)."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


def _health(server) -> dict:
    status, _, text = _http(server, "GET", "/health", key=None)
    assert status == 200
    return json.loads(text)


def _wait_idle(server, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = _health(server)
        if h["active_slots"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {timeout_s}s: {h}")


# ----------------------------------------------------------------------------- reasoning split


def test_splitter_is_chunking_invariant():
    cases = {
        SCRIPT: ("Let me add 2 and 2: that is 4.", "The answer is 4."),
        "no thinking here": (None, "no thinking here"),
        "<think>\nunfinished thought  ": ("unfinished thought", ""),
        "<think></think>\n\nhi </th": ("", "hi </th"),
        " <thinking> is not the tag": (None, " <thinking> is not the tag"),
    }
    for text, expected in cases.items():
        assert split_reasoning(text) == expected
        for step in (1, 2, 3, 7):  # every cut position of these chunk sizes
            split = ReasoningSplitter()
            got = [split.feed(text[i: i + step]) for i in range(0, len(text), step)] + [split.finish()]
            reasoning, content = "".join(r for r, _ in got), "".join(c for _, c in got)
            assert (reasoning if split.thought else None, content) == expected, (text, step)


# ----------------------------------------------------------------------------- the API


def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == [MODEL]
    h = _health(server)
    assert h["status"] == "ok" and h["slots"] == 8 and h["active_slots"] == 0


def test_chat_n_choices_usage_and_seed(server):
    messages = [{"role": "user", "content": "what is 3 plus 4?"}]
    ask = lambda: server["client"].chat.completions.create(  # noqa: E731
        model=MODEL, messages=messages, max_tokens=6, n=3, seed=11, temperature=0.9, top_p=0.95,
        extra_body={"top_k": 50})
    out = ask()
    assert len(out.choices) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    prompt_len = len(server["tok"].encode(render_chat(messages, add_generation_prompt=True)))
    assert out.usage.prompt_tokens == prompt_len
    assert 3 <= out.usage.completion_tokens <= 18
    assert out.usage.total_tokens == prompt_len + out.usage.completion_tokens
    again = ask()
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_chat_reasoning_content(server):
    client = server["client"]
    messages = [{"role": "user", "content": "what is 2 plus 2?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, seed=SCRIPT_SEED)
    msg = out.choices[0].message
    assert msg.reasoning_content == "Let me add 2 and 2: that is 4."
    assert msg.content == "The answer is 4."
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(server["engine"].script)

    reasoning, content, finish, chunks = [], [], None, 0
    with client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, seed=SCRIPT_SEED,
                                        stream=True, stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                assert chunk.usage.completion_tokens == len(server["engine"].script)
            for c in chunk.choices:
                reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
                content.append(c.delta.content or "")
                finish = c.finish_reason or finish
    assert chunks > 5  # token by token, not one blob
    assert "".join(reasoning) == msg.reasoning_content and "".join(content) == msg.content
    assert finish == "stop"


def test_completions_stop_string_and_stream(server):
    client = server["client"]
    out = client.completions.create(model=MODEL, prompt="2 plus 2", max_tokens=64, seed=SCRIPT_SEED, stop=["answer"])
    assert out.choices[0].text == SCRIPT[: SCRIPT.index("answer")]
    assert out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0] for c in client.completions.create(model=MODEL, prompt="2 plus 2", max_tokens=5, stream=True,
                                                              seed=3, temperature=0.7) if c.choices]
    assert pieces[-1].finish_reason in ("stop", "length")
    _wait_idle(server)


def test_concurrent_streams(server):
    async def one(client, i):
        n_chunks, finish = 0, None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"what is {i} plus 1?"}], max_tokens=4, seed=i,
            stream=True)
        async for chunk in stream:
            n_chunks += 1
            finish = chunk.choices[0].finish_reason or finish
        return n_chunks, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server["client"].base_url, api_key=KEY, max_retries=0,
                                      timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), 90)

    t0 = time.perf_counter()
    results = asyncio.run(main())
    print(f"32 concurrent streams in {time.perf_counter() - t0:.1f}s")
    assert len(results) == 32 and all(n >= 2 and f in ("stop", "length") for n, f in results)
    _wait_idle(server)


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server):
    client = server["client"]
    status, _, text = _http(server, "POST", "/v1/chat/completions", b'{"model": "tiny-r1", "messages": [')
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"
    assert set(json.loads(text)["error"]) >= {"message", "type", "code"}
    status, _, text = _http(server, "POST", "/v1/completions", b'{"model": "tiny-r1"}')
    assert status == 400 and json.loads(text)["error"]["param"] == "prompt"

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert e.value.body["code"] == "model_not_found"
    for bad in (0, -3):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=bad)
        assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="one two three " * 60, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with max_tokens
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_LEN)
    assert e.value.body["code"] == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, _, text = _http(server, "POST", "/v1/completions", b'{"model": "tiny-r1", "prompt": "x"}', key=None)
    assert status == 401 and "error" in json.loads(text)

    assert _health(server)["status"] == "ok"
    out = client.completions.create(model=MODEL, prompt="still there?", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_the_slot(server):
    client, worker = server["client"], server["worker"]
    _wait_idle(server)
    steps_before = _health(server)["steps"]
    with client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on"}],
                                        max_tokens=100, seed=5, stream=True) as stream:
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert worker.active_slots == 1
    h = _wait_idle(server)  # the response closed: the server must abort the request
    print(f"slot freed after {h['steps'] - steps_before} engine steps (100 were asked for)")
    assert h["steps"] - steps_before < 60, "the request ran on after the client left"
    assert not server["engine"].by_id and not worker._routes


def test_serve_cli_config_errors_exit_2():
    for args, key in ((["configs/tiny-pretrain.yaml", "model.hidden_sizee=64"], "model.hidden_sizee"),
                      (["configs/tiny-pretrain.yaml", "slots=0"], "slots"),
                      (["configs/tiny-pretrain.yaml", "port=http"], "port")):
        r = subprocess.run([sys.executable, "serve.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert key in r.stderr


def test_sse_wire_format(server):
    body = json.dumps({"model": MODEL, "prompt": "2 plus 2", "max_tokens": 3, "stream": True}).encode()
    status, headers, text = _http(server, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"
