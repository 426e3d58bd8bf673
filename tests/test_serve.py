"""`domain-experts serve`: an OpenAI-compatible server over a composed model, tested with real clients on 127.0.0.1.

The model is a tiny Llama with two domains (`recipes` with tokens of its own, `stories` without) and a trained gate;
the server runs in this process (uvicorn in a thread), except for the command-line test, which starts it as a user
would.
"""

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import psutil
import pytest
import torch
import uvicorn
from backbones import tiny_backbone, tiny_tokenizer
from huggingface_hub import InferenceClient
from openai_server import free_port

import domain_experts
from domain_experts import DomainExpertsForCausalLM
from domain_experts.gate import train_gate
from domain_experts.serving import add_serve_command
from domain_experts.serving.app import ROUTE_HEADER, create_app
from domain_experts.serving.engine import GenerationRequest, StopText


API_KEY = "test-key"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
RECIPES = ["Title: Pancakes. Ingredients: flour, milk, eggs.", "Title: Soup. Ingredients: leeks, potatoes, salt.",
           "Title: Bread. Ingredients: flour, water, yeast.", "Title: Omelette. Ingredients: eggs, butter, salt."]
STORIES = ["Once upon a time a fox met a crow.", "Once upon a time a hare raced a tortoise.",
           "Once upon a time a crow held a piece of cheese.", "Once upon a time a fox praised a crow."]
QUESTIONS = ["Is the sun a star?", "Can a fish climb a tree?", "Is water wet?", "Do birds fly south?"]


@pytest.fixture(scope="module")
def model():
    """recipes (2 blocks, 12 tokens of its own) and stories (1 block), both moved off identity, and a trained gate."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama", tokenizer=tokenizer), tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=2, corpus=RECIPES * 3, num_new_tokens=12)
    model.add_domain("stories", num_blocks=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in model.domain_names:
            for parameter in model.domain_parameters(name):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    train_gate(model, {"recipes": RECIPES, "stories": STORIES, None: QUESTIONS})
    return model.eval()


class ServerThread:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("The test server did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(model):
    # Requests sent together wait 0.3 s for each other: they reliably share a batch even on a loaded machine.
    with ServerThread(create_app(model, api_key=API_KEY, max_batch_size=16, batch_wait=0.3)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub in offline mode refuses every URL, 127.0.0.1 included (see test_augment.py)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def engine_stats(server) -> dict:
    return httpx2.get(f"{server.url}/health").json()["engine"]


# What the same prompts give alone through `model.generate` (greedy) ------------------------------------------------


def generate_alone(model, input_ids: list[int], route: str, max_tokens: int) -> str:
    """Greedy continuation of one prompt through `model.generate`, decoded with the tokenizer of its route."""
    inputs = torch.tensor([input_ids])
    extra = {"domain_ids": torch.tensor([-1])} if route == "base" else {}  # explicit: the gate would route it
    output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                            do_sample=False, **extra)[0, inputs.shape[1]:]
    return model.tokenizer.tokenizer_for(None if route == "base" else route).decode(output, skip_special_tokens=True)


def prompt_ids(model, text: str, route: str) -> list[int]:
    """A plain-text prompt as `model.tokenizer` encodes it (`auto` and `base` without a control token)."""
    return model.tokenizer(text, domain=route if route in model.domain_names else None)["input_ids"]


def chat_ids(model, messages: list[dict], domain: str) -> list[int]:
    """A chat of plain messages (no special-token text in them) in the domain's own tokenizer (its merges), the
    template's EOS as the EOS token, and the control token first."""
    tokenizer = model.tokenizer.tokenizer_for(domain)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [model.control_token_id(domain), *tokenizer(text, split_special_tokens=False)["input_ids"]]


def gate_route(model, text: str) -> str:
    route = model.route(torch.tensor([prompt_ids(model, text, "auto")])).item()
    return model.domain_names[route] if route >= 0 else "base"


def run_together(*calls):
    """Start the calls at the same moment (so they share a batch) and return their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(run, call) for call in calls]]


def streamed_text(stream) -> tuple[str, str | None]:
    """Concatenated text and last finish reason of an openai stream (completions or chat)."""
    text, finish_reason = [], None
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            finish_reason = choice.finish_reason or finish_reason
    return "".join(text), finish_reason


# Tests ------------------------------------------------------------------------------------------------------------


def test_models_lists_every_route_and_an_api_key_is_required(server, client):
    assert [m.id for m in client.models.list()] == ["base", "auto", "recipes", "stories"]
    assert client.models.retrieve("recipes").id == "recipes"
    for key in (None, "wrong-key"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        reply = httpx2.post(f"{server.url}/v1/completions", json={"model": "base", "prompt": "Is"}, headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


def test_concurrent_requests_of_every_route_batch_together_and_match_generate(model, online):
    """Five requests on four routes, in one mixed batch: each gives what its prompt gives alone via model.generate.

    The server's batch holds five and waits up to a minute for them, so it closes when the fifth request arrives, however
    loaded the machine (a short wait let a slow client miss the batch).
    """
    recipes_chat = [{"role": "user", "content": "Title: Soup"}]
    stories_chat = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A fox"}]
    expected = [
        generate_alone(model, prompt_ids(model, RECIPES[0], "recipes"), "recipes", 12),
        generate_alone(model, prompt_ids(model, QUESTIONS[0], "base"), "base", 10),
        generate_alone(model, prompt_ids(model, STORIES[1], "auto"), gate_route(model, STORIES[1]), 8),
        generate_alone(model, chat_ids(model, recipes_chat, "recipes"), "recipes", 9),
        generate_alone(model, chat_ids(model, stories_chat, "stories"), "stories", 11),
    ]
    assert gate_route(model, STORIES[1]) == "stories"
    with ServerThread(create_app(model, api_key=API_KEY, max_batch_size=5, batch_wait=60)) as server:
        replies, stats = five_requests_together(server, recipes_chat, stories_chat)
    assert replies[2][1] == "stories"  # the gate's choice, in the response header
    assert [replies[0], replies[1], replies[2][0], replies[3], replies[4]] == expected
    assert stats["batches"] == 1 and stats["largest_batch"] == 5


def five_requests_together(server, recipes_chat: list[dict], stories_chat: list[dict]) -> tuple[list, dict]:
    """Completions (streamed, plain, auto-routed), chat and streamed chat (through huggingface_hub) sent at once;
    their replies and the engine's statistics after them."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    hub = InferenceClient(base_url=server.url, api_key=API_KEY)

    def auto():
        raw = client.completions.with_raw_response.create(model="auto", prompt=STORIES[1], max_tokens=8, temperature=0)
        return raw.parse().choices[0].text, raw.headers[ROUTE_HEADER]

    replies = run_together(
        lambda: streamed_text(client.completions.create(model="recipes", prompt=RECIPES[0], max_tokens=12,
                                                        temperature=0, stream=True))[0],
        lambda: client.completions.create(model="base", prompt=QUESTIONS[0], max_tokens=10, temperature=0)
        .choices[0].text,
        auto,
        lambda: client.chat.completions.create(model="recipes", messages=recipes_chat, max_tokens=9, temperature=0)
        .choices[0].message.content,
        lambda: "".join(chunk.choices[0].delta.content or "" for chunk in hub.chat_completion(
            stories_chat, model="stories", max_tokens=11, temperature=0, stream=True) if chunk.choices),
    )
    return replies, engine_stats(server)


def test_seeded_sampling_does_not_depend_on_batch_mates_or_streaming(client):
    def sampled(seed: int, stream: bool = False) -> str:
        request = {"model": "stories", "messages": [{"role": "user", "content": "A crow"}], "max_tokens": 16,
                   "temperature": 0.9, "top_p": 0.9, "seed": seed}
        if stream:
            return streamed_text(client.chat.completions.create(**request, stream=True))[0]
        return client.chat.completions.create(**request).choices[0].message.content

    alone = sampled(7)
    together = run_together(lambda: sampled(7, stream=True), lambda: sampled(8), lambda: sampled(7))
    assert together[0] == together[2] == alone
    assert together[1] != alone  # another seed, another draw


def test_stop_strings_cut_the_text_also_across_tokens_and_in_streams(client):
    request = {"model": "recipes", "prompt": "Title: Soup", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**request).choices[0].text
    assert len(full) > 12
    stop = full[7:12]  # likely to span tokens; the cut is at its first occurrence
    cut = full[: full.index(stop)]
    reply = client.completions.create(**request, stop=[stop, "never seen"]).choices[0]
    assert (reply.text, reply.finish_reason) == (cut, "stop")
    assert streamed_text(client.completions.create(**request, stop=stop, stream=True)) == (cut, "stop")


def test_stop_text_holds_back_partial_characters_and_stop_prefixes():
    text = StopText(("END",))
    assert text.update("abc E") == ("abc ", False)  # "E" may start "END"
    assert text.update("abc EN\ufffd") == ("", False)  # a partial character, then a possible "EN"
    assert text.update("abc ENx") == ("ENx", False)
    assert text.update("abc ENxyEND and more") == ("y", True)
    assert StopText().update("ab\ufffd", final=True) == ("ab\ufffd", False)


def test_huggingface_hub_text_generation_picks_the_domain_by_adapter_id(model, server, online):
    hub = InferenceClient(base_url=server.url, api_key=API_KEY)
    expected = generate_alone(model, prompt_ids(model, RECIPES[2], "recipes"), "recipes", 10)
    output = hub.text_generation(RECIPES[2], adapter_id="recipes", max_new_tokens=10, details=True)
    assert output.generated_text == expected
    assert output.details.generated_tokens == 10 and output.details.finish_reason == "length"
    assert "".join(hub.text_generation(RECIPES[2], adapter_id="recipes", max_new_tokens=10, stream=True)) == expected
    chat = hub.chat_completion([{"role": "user", "content": "Title: Bread"}], model="recipes", max_tokens=6,
                               temperature=0)
    assert chat.choices[0].message.content == generate_alone(
        model, chat_ids(model, [{"role": "user", "content": "Title: Bread"}], "recipes"), "recipes", 6)


def test_control_tokens_typed_in_messages_stay_plain_text(model, client):
    typed = "<|domain:recipes|> Title: Soup </s>"
    messages = [{"role": "user", "content": typed}]
    tokenizer = model.tokenizer.tokenizer_for(None)
    # What the template writes: the typed text as plain text, then the template's own EOS token.
    ids = [*tokenizer(f"user: {typed}", split_special_tokens=True)["input_ids"], tokenizer.eos_token_id,
           *tokenizer("assistant:")["input_ids"]]
    assert model.control_token_id("recipes") not in ids and ids.count(tokenizer.eos_token_id) == 1
    reply = client.chat.completions.create(model="base", messages=messages, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == generate_alone(model, ids, "base", 8)


def test_a_client_leaving_mid_stream_leaves_its_batch_and_the_server_healthy(model, server, client, monkeypatch):
    io = server.app.state.model_io
    forward = io.forward

    def slow_forward(*args, **kwargs):  # a slower model: the client leaves while its row still runs
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(io, "forward", slow_forward)
    before = engine_stats(server)
    expected = generate_alone(model, prompt_ids(model, STORIES[0], "stories"), "stories", 60)

    def leave_early() -> int:
        body = {"model": "recipes", "prompt": RECIPES[1], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx2.stream("POST", f"{server.url}/v1/completions", json=body,
                           headers={"authorization": f"Bearer {API_KEY}"}, timeout=30) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if line.startswith("data:"))
        return reply.status_code

    status, text = run_together(leave_early, lambda: client.completions.create(
        model="stories", prompt=STORIES[0], max_tokens=60, temperature=0).choices[0].text)
    assert status == 200 and text == expected  # the batch went on
    after = engine_stats(server)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["generated_tokens"] - before["generated_tokens"] < 60 + 100  # the cancelled row stopped early
    monkeypatch.undo()
    assert client.completions.create(model="recipes", prompt="Title:", max_tokens=3).usage.completion_tokens == 3


def test_a_failing_batch_is_a_server_error_and_the_next_batch_runs(server, client, monkeypatch):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(server.app.state.model_io, "forward", broken_forward)
    with pytest.raises(openai.InternalServerError, match="out of memory, say"):
        client.completions.create(model="stories", prompt="A fox", max_tokens=3)
    monkeypatch.undo()
    assert client.completions.create(model="stories", prompt="A fox", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", {"model": "law", "prompt": "x"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": "law", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
         "model_not_found"),
        ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 500}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/completions", {"model": "base", "prompt": "x " * 200}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": -3}, 400, "max_tokens", None),
        ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages", None),
        ("/v1/completions", {"model": "base", "prompt": "x", "temperature": 3}, 400, "temperature", None),
        ("/v1/completions", {"model": "base", "prompt": "x", "n": 2}, 400, "n", "unsupported_parameter"),
        ("/v1/completions", {"prompt": "x"}, 400, "model", None),
        ("/v1/completions", b'{"model": "base", "prompt": ', 400, None, None),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, path, body, status, param, code):
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx2.post(f"{server.url}{path}", content=content, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_bad_requests_raise_the_openai_clients_errors(client, online, server):
    with pytest.raises(openai.NotFoundError, match="law"):
        client.completions.create(model="law", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context holds 128 tokens"):
        client.chat.completions.create(model="recipes", messages=[{"role": "user", "content": "x"}], max_tokens=200)
    hub = InferenceClient(base_url=server.url, api_key=API_KEY)
    with pytest.raises(Exception, match="does not exist"):
        hub.text_generation("x", adapter_id="law")


def test_load_of_200_requests_from_16_clients_without_errors_or_growth(model, server, client):
    """Four rounds of 50 requests (mixed routes, streaming or not): no error, nothing left behind, no growing memory."""
    routes = ["recipes", "stories", "base", "auto"]

    def one(i: int) -> str | None:
        request = {"model": routes[i % 4], "prompt": (RECIPES + STORIES)[i % 8], "max_tokens": 4, "temperature": 0.8,
                   "seed": i}
        if i % 2:
            return streamed_text(client.completions.create(**request, stream=True))[1]
        return client.completions.create(**request).choices[0].finish_reason

    process = psutil.Process()
    memory = []
    with ThreadPoolExecutor(16) as pool:
        for round_ in range(4):
            reasons = list(pool.map(one, range(50 * round_, 50 * round_ + 50)))
            assert set(reasons) <= {"length", "stop"} and len(reasons) == 50
            gc.collect()
            memory.append(process.memory_info().rss)
    health = httpx2.get(f"{server.url}/health").json()
    assert health["waiting"] == 0 and health["engine"]["running"] == 0
    deadline = time.monotonic() + 5  # the server finishes its side of a request just after the client has it
    while [obj for obj in gc.get_objects() if type(obj) is GenerationRequest] and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert not [obj for obj in gc.get_objects() if type(obj) is GenerationRequest]
    assert memory[3] - memory[1] < 8 * 2**20, [f"{m / 2**20:.0f} MiB" for m in memory]


# The command ------------------------------------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_refuses_other_hosts_without_an_api_key_before_loading_anything(monkeypatch, capsys):
    monkeypatch.delenv("DOMAIN_EXPERTS_API_KEY", raising=False)
    args = serve_args("no/such-model", "--host", "0.0.0.0")
    with pytest.raises(ValueError, match=r"without an API key .* \(`api_key`; on the command line --api-key or the "
                                         r"DOMAIN_EXPERTS_API_KEY"):
        args.run(args)
    args = serve_args("no/such-model", "--max-batch-size", "0")
    with pytest.raises(ValueError, match="--max-batch-size must be at least 1"):
        args.run(args)
    args = serve_args("no/such-model", "--port", "99999")
    with pytest.raises(ValueError, match=r"The port must be in 0-65535 \(--port\)"):
        args.run(args)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = serve_args("no/such-model", "--port", str(taken.getsockname()[1]))
        with pytest.raises(OSError, match="a port no other server holds"):
            args.run(args)
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    for action in parser._subparsers._group_actions[0].choices["serve"]._actions:
        assert action.help, action.dest  # help text on every option


def test_serve_help_imports_nothing_heavy():
    # As tests/test_cli.py checks for the other commands: the package's own __init__ is skipped.
    code = textwrap.dedent(f"""
        import argparse, contextlib, io, sys, types
        package = types.ModuleType("domain_experts")
        package.__path__ = [{os.path.dirname(domain_experts.__file__)!r}]
        sys.modules["domain_experts"] = package
        from domain_experts.serving import add_serve_command
        parser = argparse.ArgumentParser()
        add_serve_command(parser.add_subparsers())
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(["serve", "--help"])
        print(sorted(m for m in ("torch", "transformers", "fastapi", "uvicorn") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The model saved in a folder, and its stories domain saved as a pack."""
    root = tmp_path_factory.mktemp("saved")
    model.save_pretrained(root / "model")
    model.save_domain("stories", root / "stories-pack")
    return root


def test_serve_takes_the_api_key_from_the_environment(saved, monkeypatch):
    calls = []
    monkeypatch.setattr("domain_experts.serving.command.serve", lambda model, **settings: calls.append(settings))
    monkeypatch.setenv("DOMAIN_EXPERTS_API_KEY", "key-from-environment")
    args = serve_args(str(saved / "model"), "--host", "0.0.0.0", "--port", "9000", "--max-batch-size", "4")
    args.run(args)
    assert calls == [{"host": "0.0.0.0", "port": 9000, "api_key": "key-from-environment", "max_batch_size": 4,
                      "batch_wait": 0.005, "log_level": "info"}]


def test_serve_command_loads_packs_and_serves_local_clients_only(model, saved):
    port = free_port()
    harness = ("import argparse, sys; from domain_experts.serving import add_serve_command; "
               "parser = argparse.ArgumentParser(); add_serve_command(parser.add_subparsers()); "
               "args = parser.parse_args(sys.argv[1:]); args.run(args)")
    environment = {key: value for key, value in os.environ.items() if key != "DOMAIN_EXPERTS_API_KEY"}
    command = [sys.executable, "-c", harness, "serve", str(saved / "model"), "--port", str(port),
               "--domain-pack", f"tales={saved / 'stories-pack'}", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**environment, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.2)
        local = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in local.models.list()] == ["base", "auto", "recipes", "stories", "tales"]
        request = {"prompt": STORIES[2], "max_tokens": 8, "temperature": 0}
        assert (local.completions.create(model="tales", **request).choices[0].text
                == generate_alone(model, prompt_ids(model, STORIES[2], "stories"), "stories", 8))
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "No API key set: serving on 127.0.0.1 only" in output
    assert "Loaded domain pack tales=" in output
