"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

    app = create_app(engine, tokenizer, model_name="tiny-r1", api_key="sk-...")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`: SSE
`data: {...}` chunks ending with `data: [DONE]`), GET /v1/models, GET /health (no key needed;
reports the engine's active slots; 503 while draining), GET /metrics (Prometheus text format,
`r1jax.serving.metrics`; needs the key when one is set). Chat output inside `<think>…</think>` goes to
`reasoning_content`, the rest to `content` (`r1jax.serving.reasoning`).

Sampling: `temperature`, `top_p`, `top_k` (extra), `seed`, `max_tokens`, `stop`, `n`. The `n`
choices of a request share its seed and differ by sample index, so each is an independent
sample and `seed` reproduces all of them. Generation ends at the tokenizer's eos ("stop"), a
stop string ("stop"; the string is not returned) or `max_tokens` / the cache row ("length").

Text is detokenised here, on the event loop, not in the engine thread: each token re-decodes
its choice's ids (quadratic in the output length, cheap next to a decode step at the lengths
served), and text that may still change is held back (a trailing partial UTF-8 character, a
possible start of a stop string). Stop strings are matched here too; the request is then
aborted in the engine, which may have computed a token or two more.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, invalid fields and prompts that do not fit (`context_length_exceeded`), 401 for a missing
or wrong key, 404 for an unknown model, 413 for a body over `max_body_bytes`, 429 with
`Retry-After` when `slots + max_waiting` sequences are already held, 503 while shutting down
(`r1jax.serving.admission`). A client that disconnects has its requests aborted, so their slots
are free for the next step. Prompts are logged only with `log_requests=True`; CORS headers are
sent only for `cors_origins`.

Left out: logprobs in responses, tools / function calling, `echo`, penalties, `logit_bias`,
`best_of`, prompt caching across requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pydantic
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from r1jax.data.tokenizer import Tokenizer, chat_text
from r1jax.sampling.engine import Engine, Event, SamplingParams
from r1jax.serving import protocol as p
from r1jax.serving.admission import Admission, NotAdmitted
from r1jax.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from r1jax.serving.reasoning import ReasoningSplitter, opens_reasoning, partial_suffix, split_reasoning
from r1jax.serving.worker import EngineWorker, Refused

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 1.0  # non-streaming requests check for a gone client this often


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, p.error_body(message, type_, code, param), headers


class Ticket:
    """Sequences held in the admission count; `release` is idempotent."""

    def __init__(self, admission: Admission, sequences: int):
        admission.admit(sequences)
        self.admission, self.sequences, self.since = admission, sequences, time.monotonic()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self.sequences)


class _TicketedStream(StreamingResponse):
    """Releases its ticket however the response ends, even if its body was never iterated (a
    client gone before the first byte)."""

    def __init__(self, content, ticket: Ticket):
        super().__init__(content, media_type="text/event-stream")
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


class _CountResponses:
    """ASGI middleware: every HTTP response's status into the metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.response(scope["path"], status[0])


# ----------------------------------------------------------------------------- text of one choice


class ChoiceText:
    """A choice's output text as its tokens arrive: `push` returns the text that is now certain."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], stop_ids: Sequence[int]):
        self.tok, self.stops, self.stop_ids = tokenizer, tuple(stops), frozenset(stop_ids)
        self.ids: list[int] = []
        self.sent = 0  # characters returned so far
        self.finish_reason: str | None = None
        self.stopped_by_string = False

    def _decode(self, ids: list[int]) -> str:
        v = self.tok.vocab_size  # a model's vocabulary may be padded past the tokenizer's
        return self.tok.decode([i for i in ids if 0 <= i < v])

    def push(self, ev: Event) -> str:
        self.ids.append(ev.token_id)
        done = ev.finish_reason is not None
        ids = self.ids[:-1] if done and ev.finish_reason == "stop" and ev.token_id in self.stop_ids else self.ids
        text = self._decode(ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            text, self.finish_reason, self.stopped_by_string = text[: min(hits)], "stop", True
        elif done:
            self.finish_reason = ev.finish_reason
        if self.finish_reason is not None:
            new, self.sent = text[self.sent:], max(self.sent, len(text))
            return new
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            safe -= 1
        safe -= max((partial_suffix(text[:safe], s) for s in self.stops), default=0)
        new = text[self.sent: safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return new


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine | EngineWorker, tokenizer: Tokenizer, *, model_name: str = "r1jax",
               api_key: str | None = None, max_waiting: int = 64, max_body_bytes: int = 4 << 20,
               cors_origins: Sequence[str] = (), log_requests: bool = False) -> FastAPI:
    """The app; its lifespan starts the engine thread (unless `engine` is a started worker) and
    stops it at shutdown. `app.state.worker` is the `EngineWorker`, `app.state.admission` the
    `Admission` (slots + max_waiting sequences), `app.state.metrics` the `ServerMetrics`."""
    worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine)
    eng = worker.engine
    created = int(time.time())
    admission = Admission(eng.slots, max_waiting)
    metrics = ServerMetrics(worker, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = not worker.alive
        if owned:
            worker.start()
        yield
        if owned:
            worker.stop()

    app = FastAPI(title="r1jax", lifespan=lifespan)
    app.state.worker, app.state.admission, app.state.metrics = worker, admission, metrics
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_CountResponses, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(p.error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(p.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_large = APIError(413, f"The request body is over this server's limit of {max_body_bytes} bytes.",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise too_large
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body", code="client_disconnected") from None
        return bytes(body)

    async def parse(request: Request, model: type[pydantic.BaseModel]):
        check_key(request)
        try:
            data = json.loads(await read_body(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
        try:
            req = model.model_validate(data)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            msg = err["msg"].removeprefix("Value error, ")
            raise APIError(400, f"{param}: {msg}" if param else msg, code="invalid_value", param=param) from None
        if req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist. This server serves `{model_name}`.",
                           code="model_not_found", param="model")
        if log_requests:
            log.info("%s %s", request.url.path, json.dumps(data, ensure_ascii=False)[:4000])
        return req

    def admit(sequences: int) -> Ticket:
        try:
            return Ticket(admission, sequences)
        except NotAdmitted as e:
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            type_ = "invalid_request_error" if e.status == 400 else "server_error" if e.status == 503 else "requests"
            raise APIError(e.status, str(e), type_, e.code, param="n" if e.status == 400 else None,
                           headers=headers) from None

    def plan(req, prompts: list[list[int]]) -> SamplingParams:
        longest = max(len(x) for x in prompts)
        if min(len(x) for x in prompts) == 0:
            raise APIError(400, "the prompt is empty", code="invalid_value", param="prompt")
        max_tokens = req.limit if req.limit is not None else eng.max_len - longest
        if longest + max_tokens > eng.max_len or max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {eng.max_len} tokens. However, you "
                                f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the prompt or max_tokens.",
                           code="context_length_exceeded", param="max_tokens")
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                              max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_id,))

    async def run(prompts: list[list[int]], n: int, sampling: SamplingParams, stops: Sequence[str], ticket: Ticket,
                  gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[int, str, ChoiceText]]:
        """(choice index, new text, its ChoiceText) as tokens arrive; choice p * n + j is sample
        j of prompt p. Unfinished requests are aborted when the consumer stops early. The ticket
        (its admission time marks the first token's latency) is released by the caller."""
        uid = uuid.uuid4().hex
        out: asyncio.Queue = asyncio.Queue()
        subs = [((uid, i * n + j), prompt, sampling, j) for i, prompt in enumerate(prompts) for j in range(n)]
        texts = {rid: ChoiceText(tokenizer, stops, sampling.stop_token_ids) for rid, *_ in subs}
        pending = set(texts)
        last_token: dict = {}
        worker.submit(subs, out)
        try:
            while pending:
                if gone is None:
                    item = await out.get()
                else:
                    try:
                        item = await asyncio.wait_for(out.get(), _DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await gone():
                            return
                        continue
                if isinstance(item, Refused):
                    raise APIError(400, str(item), code="invalid_value")
                if isinstance(item, Exception):
                    raise APIError(500, f"the engine failed: {item}", "server_error")
                if item.request_id not in pending:
                    continue  # a token computed after a stop string ended the choice
                now = time.monotonic()
                before = last_token.get(item.request_id)
                metrics.token(now, ticket.since if before is None else None, None if before is None else now - before)
                last_token[item.request_id] = now
                text = texts[item.request_id]
                new = text.push(item)
                if text.finish_reason is not None:
                    pending.discard(item.request_id)
                    if text.stopped_by_string and item.finish_reason is None:
                        worker.abort(item.request_id)
                yield item.request_id[1], new, text
        finally:
            for rid in pending:
                worker.abort(rid)

    def usage(prompts, texts: Sequence[ChoiceText]) -> p.Usage:
        prompt_tokens = sum(len(x) for x in prompts)
        completion = sum(len(t.ids) for t in texts)
        return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)

    def sse(obj: pydantic.BaseModel) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    async def collect(prompts, n, sampling, stops, request: Request):
        parts: dict[int, list[str]] = {}
        texts: dict[int, ChoiceText] = {}
        ticket = admit(len(prompts) * n)
        try:
            async with contextlib.aclosing(run(prompts, n, sampling, stops, ticket, request.is_disconnected)) as events:
                async for index, new, text in events:
                    parts.setdefault(index, []).append(new)
                    texts[index] = text
        finally:
            ticket.release()
        if len(texts) < len(prompts) * n or any(t.finish_reason is None for t in texts.values()):
            raise APIError(400, "the client disconnected")  # nobody reads this
        return {i: "".join(parts[i]) for i in sorted(parts)}, texts

    # ------------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health():
        status = "engine stopped" if not worker.alive else "draining" if admission.draining else "ok"
        body = {"status": status, "model": model_name, "active_slots": worker.active_slots, "waiting": worker.waiting,
                "slots": eng.slots, "max_len": eng.max_len, "steps": worker.steps,
                "requests_in_flight": admission.requests, "sequences_held": admission.held,
                "capacity": admission.capacity}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        check_key(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return p.ModelList(data=[p.Model(id=model_name, created=created)])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: p.ChatCompletionRequest = await parse(request, p.ChatCompletionRequest)
        try:
            prompt_text = chat_text(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                                    add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from None
        prompts = [tokenizer.encode(prompt_text)]
        thinking = opens_reasoning(prompt_text)  # R1's template opens <think> in the prompt
        sampling = plan(req, prompts)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            outs, texts = await collect(prompts, req.n, sampling, req.stop, request)
            choices = []
            for i, full in outs.items():
                reasoning, content = split_reasoning(full, thinking=thinking)
                choices.append(p.ChatChoice(index=i, finish_reason=texts[i].finish_reason,
                                            message=p.AssistantMessage(content=content, reasoning_content=reasoning)))
            return p.ChatCompletion(id=rid, model=model_name, choices=choices, usage=usage(prompts, texts.values()))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            now = int(time.time())

            def chunk(i, delta, reason=None):
                return p.ChatCompletionChunk(id=rid, created=now, model=model_name,
                                             choices=[p.ChatChunkChoice(index=i, delta=delta, finish_reason=reason)])

            splitters = [ReasoningSplitter(thinking=thinking) for _ in range(req.n)]
            texts: dict[int, ChoiceText] = {}
            for i in range(req.n):
                yield sse(chunk(i, p.Delta(role="assistant", content="")))
            try:
                async with contextlib.aclosing(run(prompts, req.n, sampling, req.stop, ticket)) as events:
                    async for i, new, text in events:
                        texts[i] = text
                        r, c = splitters[i].feed(new)
                        if text.finish_reason is not None:
                            r2, c2 = splitters[i].finish()
                            r, c = r + r2, c + c2
                        if r or c:
                            yield sse(chunk(i, p.Delta(reasoning_content=r or None, content=c or None)))
                        if text.finish_reason is not None:
                            yield sse(chunk(i, p.Delta(), text.finish_reason))
            except APIError as e:
                yield f"data: {json.dumps(e.body)}\n\n"
                return
            if include_usage:
                yield sse(p.ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[],
                                                usage=usage(prompts, texts.values())))
            yield "data: [DONE]\n\n"

        ticket = admit(req.n)
        return _TicketedStream(stream(), ticket)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: p.CompletionRequest = await parse(request, p.CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str):
            prompts = [tokenizer.encode(raw)]
        elif raw and all(isinstance(x, str) for x in raw):
            prompts = [tokenizer.encode(x) for x in raw]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [list(raw)]
        else:
            prompts = [list(x) for x in raw]
        if not prompts or any(not 0 <= t < tokenizer.vocab_size for x in prompts for t in x):
            raise APIError(400, "prompt: token ids out of the vocabulary, or no prompt", code="invalid_value",
                           param="prompt")
        sampling = plan(req, prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if not req.stream:
            outs, texts = await collect(prompts, req.n, sampling, req.stop, request)
            choices = [p.CompletionChoice(index=i, text=t, finish_reason=texts[i].finish_reason)
                       for i, t in outs.items()]
            return p.Completion(id=rid, model=model_name, choices=choices, usage=usage(prompts, texts.values()))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            now = int(time.time())
            texts: dict[int, ChoiceText] = {}
            try:
                async with contextlib.aclosing(run(prompts, req.n, sampling, req.stop, ticket)) as events:
                    async for i, new, text in events:
                        texts[i] = text
                        if new or text.finish_reason is not None:
                            yield sse(p.Completion(id=rid, created=now, model=model_name, choices=[
                                p.CompletionChoice(index=i, text=new, finish_reason=text.finish_reason)]))
            except APIError as e:
                yield f"data: {json.dumps(e.body)}\n\n"
                return
            if include_usage:
                yield sse(p.Completion(id=rid, created=now, model=model_name, choices=[],
                                       usage=usage(prompts, texts.values())))
            yield "data: [DONE]\n\n"

        ticket = admit(len(prompts) * req.n)
        return _TicketedStream(stream(), ticket)

    app.openapi = lambda: openapi_schema(app, model_name)
    return app


def openapi_schema(app: FastAPI, model_name: str) -> dict:
    """FastAPI's schema plus the request bodies: the endpoints parse their JSON themselves (to
    answer in OpenAI's error shape), so FastAPI does not know them; clients and fuzzers should.
    `model` is the one model served."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", p.ChatCompletionRequest), ("/v1/completions", p.CompletionRequest)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"] = {"type": "string", "enum": [model_name]}
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    app.openapi_schema = schema
    return schema
