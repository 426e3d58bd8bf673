"""Request bodies and response objects of the server: OpenAI's shapes for `/v1/...`, TGI's for `/generate`.

Requests are pydantic models: fields outside the schema are ignored (clients send many), fields of the schema that the
server does not implement are refused with a clear error unless they hold their default, and every value is checked
before a request reaches the engine.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import SamplingParams


# Errors -------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered to the client: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def openai_body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tgi_body(self) -> dict:
        """`{"error", "error_type"}`, as text-generation-inference answers (huggingface_hub raises by `error_type`)."""
        return {"error": self.message, "error_type": "validation" if self.status < 500 else "generation"}


def unsupported(param: str, hint: str = "") -> APIError:
    return APIError(400, f"`{param}` is not supported by this server{': ' + hint if hint else '.'}", param=param,
                    code="unsupported_parameter")


# OpenAI requests ----------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or len(stops) > 16 or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 16 non-empty strings")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise unsupported("n", "send one request per completion (concurrent requests are batched together)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise unsupported(name)
        if self.logit_bias:
            raise unsupported("logit_bias")

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise APIError(400, "prompt must be one string: send one request per prompt (concurrent requests are "
                                "batched together).", param="prompt")
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise unsupported(name)
        if self.best_of not in (None, 1):
            raise unsupported("best_of")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise unsupported("tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported("response_format")
        if self.logprobs:
            raise unsupported("logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# OpenAI responses ---------------------------------------------------------------------------------------------------

OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(request_id: str, model: str, choices: list[dict], usage: dict | None, chunk: bool,
                      chat: bool) -> dict:
    """A `text_completion`, `chat.completion` or `chat.completion.chunk` object."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None or not chunk:
        body["usage"] = usage
    return body


def model_list(route_names: list[str], owner: str) -> dict:
    """`GET /v1/models`: one entry per route."""
    created = int(time.time())
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": owner} for name in route_names]}


# TGI requests (huggingface_hub's `InferenceClient.text_generation` with a URL) --------------------------------------

TGI_FINISH_REASONS = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}


class GenerateParameters(_Request):
    adapter_id: str | None = None
    max_new_tokens: int | None = Field(100, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    return_full_text: bool | None = None
    best_of: int | None = None
    decoder_input_details: bool | None = None
    frequency_penalty: float | None = None
    grammar: Any = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("return_full_text", "decoder_input_details", "grammar", "top_k", "top_n_tokens", "truncate",
                     "typical_p", "watermark", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server")
        if self.repetition_penalty not in (None, 1.0):
            raise ValueError("repetition_penalty is not supported by this server")
        return self

    def sampling(self) -> SamplingParams:
        """Greedy unless `do_sample`, `temperature` or `top_p` asks for sampling (as TGI does)."""
        sample = self.do_sample or self.temperature is not None or self.top_p is not None
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=(self.temperature or 1.0) if sample else 0.0,
            top_p=self.top_p or 1.0,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class GenerateRequest(_Request):
    """`POST /generate`, `POST /generate_stream` and `POST /` (TGI's API)."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False
