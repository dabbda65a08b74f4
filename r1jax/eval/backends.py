"""Where the samples come from: a `GenerateFn` on the in-process engine or on an OpenAI-compatible
server, and loading a checkpoint for the first.

    generate_fn(questions, k, seeds) -> [[Sample] * k] * len(questions)

questions: question records (`benchmarks`), with "prompt" (chat-template text) for the engine,
"content" (the user message) for a server; seeds[i]: question i's sampling seed. Sample j of
question i is drawn from (seeds[i], sample index j) alone: the engine's per-request seed and an
OpenAI request's `seed` with `n=k` (r1jax's server gives choice j sample index j) do exactly
that, so what a question gets does not depend on the batching, and both backends agree.

Completion text, both backends alike: r1jax's server returns the reasoning inside
`<think>…</think>` apart (`reasoning_content`) with the whitespace around it dropped, so the
engine's text goes through the same split (`r1jax.serving.reasoning`) and both are joined back as
`completion_text` does: `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, the opening tag written
even where the chat template put it in the prompt; a reasoning still open at max_tokens stays open.

Lengths: completion tokens, a final eos included. A server reports only the total of a request's
n choices: per choice, max_tokens for a choice cut off there, else the choice's text re-encoded
(+1 for the eos) with a tokenizer, else the request's total / n (exact for n=1).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence

from r1jax.sampling.engine import BATCH_DECODE_CHUNK, Engine, SamplingParams, Weights
from r1jax.sampling.steps import pow2
from r1jax.serving.reasoning import opens_reasoning, split_reasoning


@dataclasses.dataclass(frozen=True)
class Sample:
    text: str  # the completion (see completion_text)
    finish_reason: str  # "stop" | "length"
    length: int  # completion tokens


GenerateFn = Callable[[list[dict], int, list[int]], list[list[Sample]]]


def completion_text(reasoning: str | None, content: str, finish_reason: str) -> str:
    """The completion rebuilt from its reasoning (None: the output did not reason) and content."""
    if reasoning is None:
        return content
    if not content and finish_reason == "length":
        return f"<think>\n{reasoning}"  # cut off while thinking
    return f"<think>\n{reasoning}\n</think>\n\n{content}"


def canonical(raw: str, prompt: str, finish_reason: str) -> str:
    """A raw completion as r1jax's server returns it, joined back (`completion_text`)."""
    reasoning, content = split_reasoning(raw, thinking=opens_reasoning(prompt))
    return completion_text(reasoning, content, finish_reason)


# ----------------------------------------------------------------------------- in-process


def load_weights(checkpoint: str | os.PathLike, cfg) -> Weights:
    """The weights of an r1jax run dir, a params export or an HF model directory, for the model of
    run config `cfg` (found with its tokenizer by `rejection.load_run`, as serve.py finds them)."""
    from r1jax import checkpoint as ckpt_lib
    from r1jax.model.decoder import abstract_decoder

    graphdef, abstract_params, abstract_extra = abstract_decoder(cfg.model)
    params, extra = ckpt_lib.load_params(checkpoint, (abstract_params, abstract_extra))
    return Weights(graphdef, params, extra)


def make_engine(weights, tokenizer, questions: Sequence[dict], *, k: int, max_tokens: int, batch_prompts: int,
                slots: int | None = None) -> Engine:
    """An Engine sized for the questions: a cache row fits the longest prompt and max_tokens (a
    power of two, at most the model's max_position_embeddings); slots for a chunk's samples (<= 64)."""
    longest = max(len(q["prompt_ids"]) if "prompt_ids" in q else len(tokenizer.encode(q["prompt"])) for q in questions)
    w = Weights.of(weights)
    max_len = min(w.cfg.max_position_embeddings, pow2(longest + max_tokens, 64))
    slots = slots or min(64, pow2(batch_prompts * k, 8))
    return Engine(w, slots=slots, max_len=max_len, decode_chunk=BATCH_DECODE_CHUNK)


def engine_generate_fn(engine: Engine, tokenizer, *, temperature: float = 0.6, top_p: float = 0.95,
                       max_tokens: int = 512) -> GenerateFn:
    """A `GenerateFn` on an engine (any model the engine takes: a Decoder, Weights, a TrainState)."""
    vocab = tokenizer.vocab_size  # a model's vocabulary may be padded past the tokenizer's

    def generate_fn(questions: list[dict], k: int, seeds: list[int]) -> list[list[Sample]]:
        tag = uuid.uuid4().hex  # request ids unique on a shared engine
        for i, (q, seed) in enumerate(zip(questions, seeds)):
            ids = q["prompt_ids"] if "prompt_ids" in q else tokenizer.encode(q["prompt"])
            sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens,
                                      stop_token_ids=(tokenizer.eos_id,))
            for j in range(k):
                engine.add_request((tag, i, j), ids, sampling, sample_index=j)
        while engine.has_work():
            engine.step()
        out = []
        for i, q in enumerate(questions):
            samples = []
            for j in range(k):
                c = engine.pop_result((tag, i, j))
                ids = c.token_ids[:-1] if c.finish_reason == "stop" and c.token_ids[-1:] == [tokenizer.eos_id] \
                    else c.token_ids
                raw = tokenizer.decode([t for t in ids if 0 <= t < vocab])
                prompt = q["prompt"] if "prompt" in q else tokenizer.decode(q["prompt_ids"])
                samples.append(Sample(canonical(raw, prompt, c.finish_reason), c.finish_reason, len(c.token_ids)))
            out.append(samples)
        return out

    return generate_fn


# ----------------------------------------------------------------------------- server


class EndpointError(RuntimeError):
    """The server refused a request or could not be reached; the message is one line."""


def _request(url: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not OpenAI's error shape
            message = e.reason
        raise EndpointError(f"{url}: HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EndpointError(f"{url}: {getattr(e, 'reason', e)}") from None


def served_model(endpoint: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model a server lists (GET /models)."""
    models = _request(endpoint.rstrip("/") + "/models", None, api_key, timeout).get("data") or []
    if not models:
        raise EndpointError(f"{endpoint}/models: the server lists no model; pass model=NAME")
    return models[0]["id"]


def endpoint_generate_fn(endpoint: str, *, model: str | None = None, temperature: float = 0.6,
                         top_p: float = 0.95, max_tokens: int = 512, tokenizer=None, api_key: str | None = None,
                         concurrency: int = 32, timeout: float = 3600.0) -> GenerateFn:
    """A `GenerateFn` on an OpenAI-compatible server at `endpoint` (".../v1"): one
    /chat/completions request per question (the user message, n=k, its seed), up to
    `concurrency` at a time so the server batches them."""
    url = endpoint.rstrip("/") + "/chat/completions"
    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    name = model or served_model(endpoint, api_key)

    def one(question: dict, k: int, seed: int) -> list[Sample]:
        body = {"model": name, "messages": [{"role": "user", "content": question["content"]}], "n": k,
                "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        resp = _request(url, body, api_key, timeout)
        choices = sorted(resp["choices"], key=lambda c: c["index"])
        if len(choices) != k:
            raise EndpointError(f"{url}: {len(choices)} choices for n={k}")
        total = (resp.get("usage") or {}).get("completion_tokens")
        samples = []
        for c in choices:
            msg, finish = c["message"], c.get("finish_reason") or "stop"
            text = completion_text(msg.get("reasoning_content"), msg.get("content") or "", finish)
            if k == 1 and total is not None:
                length = int(total)
            elif finish == "length":
                length = max_tokens
            elif tokenizer is not None:
                length = len(tokenizer.encode(text)) + 1
            else:
                length = math.ceil((total or 0) / k)
            samples.append(Sample(text, finish, length))
        return samples

    def generate_fn(questions: list[dict], k: int, seeds: list[int]) -> list[list[Sample]]:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(concurrency, len(questions)))) as pool:
            return list(pool.map(lambda qs: one(qs[0], k, qs[1]), zip(questions, seeds)))

    return generate_fn
