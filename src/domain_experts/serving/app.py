"""The HTTP API: an OpenAI-compatible server (and TGI's `/generate`) over one composed model.

`"model"` in a request picks the route: a domain name, `base` (the bare backbone) or `auto` (the learned gate decides
on the prompt). For TGI's API (`huggingface_hub.InferenceClient.text_generation`), `parameters.adapter_id` does, as in
TGI and LoRAX; without one the route is `auto`.
"""

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from transformers.utils import logging

from .engine import Event, Failed, Finished, GenerationEngine, SamplingParams, Token
from .model_io import AUTO, ModelIO
from .schemas import (
    OPENAI_FINISH_REASONS,
    TGI_FINISH_REASONS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    completion_object,
    model_list,
    new_id,
    usage_counts,
)


logger = logging.get_logger(__name__)

ROUTE_HEADER = "x-domain-experts-route"
"""Response header naming the route a request ran on (what the gate chose, for `auto`)."""


def create_app(model, api_key: str | None = None, max_batch_size: int = 16, batch_wait: float = 0.005) -> FastAPI:
    """The FastAPI app serving `model` (a `DomainExpertsForCausalLM` with a tokenizer).

    Args:
        api_key: when set, every request but `GET /health` must send `Authorization: Bearer <api_key>`.
        max_batch_size: the most requests generated together (1: one request at a time).
        batch_wait: seconds the engine waits for more requests once one arrives.

    The generation engine starts with the app (its lifespan) and stops with it; `app.state.engine` is the engine.
    """
    io = ModelIO(model)
    engine = GenerationEngine(io, max_batch_size=max_batch_size, batch_wait=batch_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="domain_experts", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_io = io
    _add_error_handlers(app)
    authorized = [Depends(_bearer_check(api_key))]

    @app.get("/health")
    def health():
        status = 200 if engine.alive else 503
        return JSONResponse({"status": "ok" if engine.alive else "unhealthy", "waiting": engine.waiting,
                             "engine": asdict(engine.stats)}, status_code=status)

    @app.get("/v1/models", dependencies=authorized)
    def list_models():
        return model_list(io.route_names, owner="domain_experts")

    @app.get("/v1/models/{name}", dependencies=authorized)
    def get_model(name: str):
        _route(io, name)
        return model_list([name], owner="domain_experts")["data"][0]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest):
        body.check_supported()
        route = _route(io, body.model)
        prompt_ids = io.encode_prompt(body.text, route)
        params = body.sampling(_max_tokens(io, len(prompt_ids), body.max_tokens, "prompt"))
        return await _openai_response(engine, body, prompt_ids, route, params, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest):
        body.check_supported()
        route = _route(io, body.model)
        try:
            prompt_ids = io.encode_chat([message.as_dict() for message in body.messages], route)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        params = body.sampling(_max_tokens(io, len(prompt_ids), body.requested_max_tokens, "messages"))
        return await _openai_response(engine, body, prompt_ids, route, params, chat=True)

    async def tgi(body: GenerateRequest, stream: bool, as_list: bool = False):
        route = _route(io, body.parameters.adapter_id or AUTO, param="adapter_id")
        prompt_ids = io.encode_prompt(body.inputs, route)
        params = body.parameters.sampling()
        _max_tokens(io, len(prompt_ids), params.max_tokens, "inputs")
        return await _tgi_response(engine, body, prompt_ids, route, params, stream, as_list)

    @app.post("/generate", dependencies=authorized)
    async def generate(body: GenerateRequest):
        return await tgi(body, stream=False)

    @app.post("/generate_stream", dependencies=authorized)
    async def generate_stream(body: GenerateRequest):
        return await tgi(body, stream=True)

    @app.post("/", dependencies=authorized)
    async def tgi_compat(body: GenerateRequest):
        return await tgi(body, stream=body.stream, as_list=True)

    return app


# Requests -----------------------------------------------------------------------------------------------------------


def _bearer_check(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")

    return check


def _route(io: ModelIO, name: str, param: str = "model") -> int | None:
    if name not in io.route_names:
        raise APIError(404, f"The model {name!r} does not exist: this server routes to {', '.join(io.route_names)}.",
                       param=param, code="model_not_found")
    return io.route_index(name)


def _max_tokens(io: ModelIO, prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
    """The request's max_tokens (by default, the rest of the context), checked against the context length."""
    if prompt_tokens == 0:
        raise APIError(400, "The prompt is empty: give the model some text to continue.", param=prompt_param)
    room = io.context_length - prompt_tokens
    if requested is None and room >= 1:
        return room
    if requested is None or requested > room:
        asked = f"{prompt_tokens} in the prompt" + (f" + {requested} to generate" if requested else "")
        raise APIError(400, f"This model's context holds {io.context_length} tokens, but {asked} were asked for: "
                            "shorten the prompt or lower max_tokens.",
                       param="max_tokens" if requested is not None and room >= 1 else prompt_param,
                       code="context_length_exceeded")
    return requested


async def _start(engine: GenerationEngine, prompt_ids: list[int], route: int | None, params: SamplingParams):
    """Queue the request and wait for its batch to start; returns the route it runs on and its remaining events."""
    if not engine.alive:
        raise APIError(503, "The generation engine is not running.", type="server_error")
    events = engine.generate(prompt_ids, route, params)
    first = await anext(events)
    if isinstance(first, Failed):
        await events.aclose()
        raise APIError(500, first.message, type="server_error")
    return first.route, events


async def _collect(events: AsyncIterator[Event]) -> tuple[list[Token], Finished]:
    tokens = []
    try:
        async for event in events:
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            if isinstance(event, Token):
                tokens.append(event)
            elif isinstance(event, Finished):
                return tokens, event
    finally:
        await events.aclose()
    raise APIError(500, "Generation ended without finishing.", type="server_error")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# OpenAI responses ---------------------------------------------------------------------------------------------------


async def _openai_response(engine, body, prompt_ids, route, params, chat: bool):
    route_name, events = await _start(engine, prompt_ids, route, params)
    request_id = new_id("chatcmpl" if chat else "cmpl")
    headers = {ROUTE_HEADER: route_name}
    if body.stream:
        stream = _openai_stream(events, request_id, body.model, chat, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    tokens, finished = await _collect(events)
    text = "".join(token.text for token in tokens)
    reason = OPENAI_FINISH_REASONS[finished.reason]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    counts = usage_counts(finished.prompt_tokens, finished.completion_tokens)
    return JSONResponse(completion_object(request_id, body.model, [choice], counts, chunk=False, chat=chat),
                        headers=headers)


def _openai_chunk(request_id: str, model: str, chat: bool, text: str | None = None, role: bool = False,
                  finish_reason: str | None = None) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return completion_object(request_id, model, [choice], None, chunk=True, chat=chat)


async def _openai_stream(events: AsyncIterator[Event], request_id: str, model: str, chat: bool,
                         include_usage: bool) -> AsyncIterator[str]:
    try:
        if chat:
            yield _sse(_openai_chunk(request_id, model, chat, role=True))
        async for event in events:
            if isinstance(event, Token) and event.text:
                yield _sse(_openai_chunk(request_id, model, chat, text=event.text))
            elif isinstance(event, Finished):
                yield _sse(_openai_chunk(request_id, model, chat, finish_reason=OPENAI_FINISH_REASONS[event.reason]))
                if include_usage:
                    counts = usage_counts(event.prompt_tokens, event.completion_tokens)
                    yield _sse(completion_object(request_id, model, [], counts, chunk=True, chat=chat))
            elif isinstance(event, Failed):
                yield _sse(APIError(500, event.message, type="server_error").openai_body())
                return
        yield _sse("[DONE]")
    finally:
        await events.aclose()  # a client that went away: its row leaves the batch, the batch goes on


# TGI responses ------------------------------------------------------------------------------------------------------


def _tgi_token(token: Token) -> dict:
    return {"id": token.token_id, "text": token.text, "logprob": token.logprob, "special": token.special}


async def _tgi_response(engine, body: GenerateRequest, prompt_ids, route, params, stream: bool, as_list: bool):
    route_name, events = await _start(engine, prompt_ids, route, params)
    headers = {ROUTE_HEADER: route_name}
    if stream:
        stream = _tgi_stream(events, len(prompt_ids), sampled=params.temperature > 0)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    tokens, finished = await _collect(events)
    result = {"generated_text": "".join(token.text for token in tokens)}
    if body.parameters.details:
        result["details"] = {"finish_reason": TGI_FINISH_REASONS[finished.reason],
                             "generated_tokens": finished.completion_tokens, "prefill": [],
                             "seed": finished.seed if params.temperature > 0 else None,  # as TGI: greedy has none
                             "tokens": [_tgi_token(token) for token in tokens]}
    return JSONResponse([result] if as_list else result, headers=headers)


async def _tgi_stream(events: AsyncIterator[Event], input_length: int, sampled: bool) -> AsyncIterator[str]:
    """TGI's stream: one event per token; the last one also carries the whole text and the details."""
    pending: Token | None = None
    text = []
    index = 0
    try:
        async for event in events:
            if isinstance(event, Token):
                if pending is not None:
                    index += 1
                    yield _sse({"index": index, "token": _tgi_token(pending), "generated_text": None, "details": None})
                pending = event
                text.append(event.text)
            elif isinstance(event, Finished) and pending is not None:
                details = {"finish_reason": TGI_FINISH_REASONS[event.reason],
                           "generated_tokens": event.completion_tokens, "input_length": input_length,
                           "seed": event.seed if sampled else None}
                yield _sse({"index": index + 1, "token": _tgi_token(pending), "generated_text": "".join(text),
                            "details": details})
            elif isinstance(event, Failed):
                yield _sse(APIError(500, event.message).tgi_body())
                return
    finally:
        await events.aclose()


# Errors -------------------------------------------------------------------------------------------------------------


def _is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error_response(request: Request, error: APIError) -> JSONResponse:
    if _is_openai_path(request):
        return JSONResponse(error.openai_body(), status_code=error.status)
    return JSONResponse(error.tgi_body(), status_code=error.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problem = error.errors()[0]
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        if problem.get("type") == "json_invalid":
            message, param = f"The request body is not valid JSON: {problem.get('ctx', {}).get('error', '')}", None
        else:
            param = ".".join(location) or None
            reason = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"Invalid value for {param}: {reason}." if param else f"Invalid request: {reason}."
        status = 400 if _is_openai_path(request) else 422  # TGI answers validation errors with 422
        return _error_response(request, APIError(status, message, param=param))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("Unexpected error in a request")
        return _error_response(request, APIError(500, f"Internal error: {type(error).__name__}: {error}",
                                                 type="server_error"))
