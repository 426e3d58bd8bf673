"""The generation engine: one thread owns the model and runs requests of any routes as mixed batches.

Requests queue up; the engine takes the first, waits `batch_wait` seconds for more (up to `max_batch_size`), and runs
them as one left-padded batch: a prefill, then one token per step with the KV cache, each row with its own route (kept
from its prompt), sampling settings and random generator, so a request's output does not depend on its batch-mates.
A row leaves the batch when it finishes (its cache rows are dropped); requests arriving meanwhile wait for the next
batch. Each row's text streams back as it is decoded.
"""

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from .model_io import ModelIO


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: the most tokens to generate.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling: sample among the most probable tokens whose probabilities sum to `top_p`.
        seed: seeds the request's own random generator; None draws one (reported back).
        stop: strings that end the text; the text stops before the first one found.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """The request's batch started; `route` is the route it runs on (what the gate chose, for `auto`)."""

    route: str


@dataclass(frozen=True)
class Token:
    """One generated token and the text it completes (empty while held back: a partial character or a possible
    start of a stop string; the final token's text carries all that was held back)."""

    token_id: int
    logprob: float
    text: str
    special: bool


@dataclass(frozen=True)
class Finished:
    """The request is done. `reason`: "eos" (end-of-sequence token), "stop" (a stop string), "length" (max_tokens)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int


@dataclass(frozen=True)
class Failed:
    """Generation failed for the whole batch (the engine goes on with the next one)."""

    message: str


Event = Started | Token | Finished | Failed


@dataclass
class GenerationRequest:
    """One request as the engine sees it. `route`: a route index, or None for the gate to decide."""

    prompt_ids: list[int]
    route: int | None
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class EngineStats:
    """Counters since start (read by `/health`)."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    running: int = 0


class StopText:
    """Turns a row's decoded text, step by step, into the pieces that are safe to send.

    Holds back a trailing partial UTF-8 character (decoded as U+FFFD) and any end of the text that could be the start
    of a stop string, so a stop string split across tokens is never sent; cuts the text before the first stop string.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = tuple(s for s in stop if s)
        self.sent = 0

    def update(self, text: str, final: bool = False) -> tuple[str, bool]:
        """The new piece of `text` (the whole text decoded so far) to send, and whether a stop string ended it."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest)
        cuts = [position for s in self.stop if (position := text.find(s, start)) >= 0]
        stopped = bool(cuts)
        if stopped:
            text, final = text[: min(cuts)], True
        end = len(text) if final else len(text) - self._held_back(text)
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece, stopped

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` to keep for later."""
        stable = text.rstrip("\ufffd")
        stop_prefix = max(
            (k for s in self.stop for k in range(1, min(len(s) - 1, len(stable)) + 1) if stable.endswith(s[:k])),
            default=0,
        )
        return len(text) - len(stable) + stop_prefix


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]):
    """The next token of each row, greedy or sampled with the row's own generator, and its log-probability.

    Args:
        logits (`torch.FloatTensor` of shape `(batch, vocab_size)`): next-token logits (`-inf` for tokens a row may
            never produce).

    Returns:
        `torch.LongTensor` of shape `(batch,)` and `torch.FloatTensor` of shape `(batch,)` (log-probabilities under
        the model's distribution, before temperature and top-p).
    """
    tokens = logits.argmax(dim=-1)
    for row, (settings, generator) in enumerate(zip(params, generators)):
        if settings.temperature > 0:
            tokens[row] = _sample(logits[row], settings, generator)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def _sample(logits: torch.Tensor, settings: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One draw from `softmax(logits / temperature)` restricted to the top-p nucleus, by inverting its CDF at a
    uniform number from `generator` (one number per token, whatever the vocabulary or the batch)."""
    probabilities = torch.softmax(logits / settings.temperature, dim=-1)
    order = None
    if settings.top_p < 1.0:
        probabilities, order = probabilities.sort(descending=True)
        probabilities = probabilities * ((probabilities.cumsum(-1) - probabilities) < settings.top_p)
    cumulative = probabilities.cumsum(-1)
    target = torch.rand((), generator=generator, device=generator.device) * cumulative[-1]
    index = torch.searchsorted(cumulative, target[None], right=True).clamp(max=logits.shape[-1] - 1)[0]
    return order[index] if order is not None else index


class _Row:
    """A request while its batch runs."""

    def __init__(self, request: GenerationRequest, route: int, io: ModelIO):
        self.request = request
        self.route = route
        self.io = io
        self.seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed % 2**64)
        self.text = StopText(request.params.stop)
        self.generated: list[int] = []
        self.position = len(request.prompt_ids)
        self.done = False

    def advance(self, token_id: int, logprob: float) -> None:
        """Take the row's next token: send its text, and finish the row if it ends here."""
        params = self.request.params
        self.generated.append(token_id)
        self.position += 1
        is_eos = token_id in self.io.eos_token_ids
        final = is_eos or len(self.generated) >= params.max_tokens or self.position >= self.io.context_length
        piece, stopped = self.text.update(self.io.decode(self.generated, self.route), final)
        self.request.emit(Token(token_id, logprob, piece, self.io.is_special(token_id, self.route)))
        if stopped or final:
            reason = "stop" if stopped else "eos" if is_eos else "length"
            self.finish(reason)

    def finish(self, reason: str) -> None:
        self.done = True
        self.request.emit(Finished(reason, len(self.request.prompt_ids), len(self.generated), self.seed))


class GenerationEngine:
    """Runs generation requests in mixed batches on a thread of its own (see the module docstring).

    Args:
        io: the model, through `ModelIO`.
        max_batch_size: the most requests in one batch (1: one request at a time).
        batch_wait: seconds to wait for more requests after the first one of a batch arrives.
    """

    def __init__(self, io: ModelIO, max_batch_size: int = 16, batch_wait: float = 0.005):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must be at least 0 seconds, got {batch_wait}.")
        self.io = io
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.stats = EngineStats()
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # Lifecycle ------------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="domain-experts-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in flight, fail the requests still waiting, and end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests queued for a later batch."""
        return self._queue.qsize()

    # Submitting -----------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`; its events come through `request.emit`, from the engine thread."""
        if not self.alive:
            raise RuntimeError("The generation engine is not running.")
        self.stats.requests += 1
        self._queue.put(request)

    async def generate(self, prompt_ids: list[int], route: int | None, params: SamplingParams) -> AsyncIterator[Event]:
        """Queue a request from the event loop and yield its events, up to `Finished` or `Failed`.

        Closing the iterator early (a client that went away) cancels the request: it leaves its batch at the next
        step, and the batch goes on.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                request.cancelled.set()

        request = GenerationRequest(prompt_ids, route, params, emit)
        self.submit(request)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            request.cancelled.set()

    # The engine thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if batch:
                self._run_batch(batch)
            batch = None  # a finished batch's requests (and their clients' queues) must not wait for the next batch
        while True:  # stopping: fail whatever still waits
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.emit(Failed("The server is shutting down."))

    def _next_batch(self) -> list[GenerationRequest] | None:
        """The next requests to run together (not cancelled ones), or None when the engine stops."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(request)
        live = [request for request in batch if not request.cancelled.is_set()]
        self.stats.cancelled += len(batch) - len(live)
        return live

    def _run_batch(self, requests: list[GenerationRequest]) -> None:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        self.stats.running = len(requests)
        rows: list[_Row] = []
        try:
            with torch.inference_mode():
                self._decode(requests, rows)
        except Exception as error:  # one bad batch must not take the server down
            logger.exception("Generation failed for a batch")
            done = {id(row.request) for row in rows if row.done}
            for request in requests:
                if id(request) not in done:
                    request.emit(Failed(f"Generation failed: {type(error).__name__}: {error}"))
        finally:
            self.stats.running = 0

    def _decode(self, requests: list[GenerationRequest], rows: list[_Row]) -> None:
        """Prefill the batch, then one token per step until every row is done; `rows` fills as rows are built."""
        io = self.io
        prompts = [request.prompt_ids for request in requests]
        routes = io.decide_routes(prompts, [request.route for request in requests])
        for request, route in zip(requests, routes.tolist()):
            rows.append(_Row(request, route, io))
            request.emit(Started(io.route_name(route)))
        active = list(rows)
        input_ids, attention_mask = io.left_pad(prompts)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = io.forward(input_ids, attention_mask, position_ids, None, routes)
        while True:
            tokens, logprobs = choose_tokens(
                logits, [row.request.params for row in active], [row.generator for row in active]
            )
            for row, token_id, logprob in zip(active, tokens.tolist(), logprobs.tolist()):
                if row.request.cancelled.is_set():
                    row.done = True
                    self.stats.cancelled += 1
                    continue
                row.advance(token_id, logprob)
                self.stats.generated_tokens += 1
            keep = [index for index, row in enumerate(active) if not row.done]
            if not keep:
                return
            if len(keep) < len(active):
                # Finished rows leave the batch: their share of every later step is saved, for one copy of the cache.
                kept = torch.tensor(keep, device=attention_mask.device)
                io.keep_rows(cache, kept)
                attention_mask, routes, tokens = attention_mask[kept], routes[kept.cpu()], tokens[kept]
                active = [active[index] for index in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            position_ids = torch.tensor([[row.position - 1] for row in active], device=attention_mask.device)
            logits, cache = io.forward(tokens[:, None], attention_mask, position_ids, cache, routes)
