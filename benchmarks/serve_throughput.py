"""Issue 16: `domain-experts serve` under concurrent clients of mixed domains, against the same server taking one
request at a time, and against peft's mixed-adapter `generate` with a LoRA of the same size.

SmolLM2-135M-Instruct with a 4-block `recipes` domain; half the requests go to `recipes`, half to `base`. Each client
sends its requests one after the other (streaming completions, greedy, `--max-tokens` each), so `--clients` requests
are in flight at once. Measured: generated tokens per second over the whole run, and the time to the first token of
each request (median and 90th percentile, seen by the client). The offline rows run the same prompts as batches of
`--clients` rows through `generate` (peft: the LoRA on the `recipes` rows, `__base__` on the others; DomainExperts:
the domain's control token on the `recipes` rows): they have no time to first token, only the whole batch's latency.

    python benchmarks/serve_throughput.py        # the defaults: 15 to 20 minutes on 2 idle cores (an estimate)
    python benchmarks/serve_throughput.py --requests 16 --max-tokens 16 --threads 1   # a check: 9 minutes, loaded

The server runs in a subprocess with `--threads` torch threads; the clients (asyncio tasks with a plain HTTP client,
light on the CPU the server needs) and the offline runs in this process. Results:
`benchmarks/results/serve_throughput.{json,md}` (`--results-dir`), the model and server logs in `--work-dir`.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import torch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.files import write_file_atomically
from domain_experts.smollm2 import load_smollm2


RECIPE_PROMPTS = [
    "Title: Lemon pancakes\nIngredients:", "Title: Tomato soup\nIngredients:", "Title: Banana bread\nIngredients:",
    "Title: Garlic butter shrimp\nIngredients:", "Title: Apple crumble\nIngredients:",
    "Title: Chicken curry\nIngredients:", "Title: Potato salad\nIngredients:", "Title: Chocolate cookies\nIngredients:",
]
BASE_PROMPTS = [
    "Once upon a time, a little fox", "The tortoise and the hare agreed to", "Is the sun a star? Explain briefly:",
    "A short poem about the sea:", "The three most important rules of chess are", "Dear diary, today I",
    "The history of the bicycle begins", "Write one sentence about the moon:",
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVER = "server, dynamic batching"
ONE_AT_A_TIME = "server, one request at a time"
PEFT = "peft mixed-adapter generate (offline)"
OFFLINE = "DomainExperts generate (offline)"


def request_plan(index: int) -> tuple[str, str]:
    """(route, prompt) of the `index`-th request of a run: even requests to `recipes`, odd ones to `base`."""
    if index % 2 == 0:
        return "recipes", RECIPE_PROMPTS[index // 2 % len(RECIPE_PROMPTS)]
    return "base", BASE_PROMPTS[index // 2 % len(BASE_PROMPTS)]


def build_model(work_dir: Path, num_blocks: int) -> tuple[Path, int]:
    """SmolLM2 with a `recipes` domain whose blocks are moved off identity (as a trained domain would be), saved."""
    backbone, tokenizer = load_smollm2()
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=num_blocks)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.domain_parameters("recipes"):
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
    folder = work_dir / "model"
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.domain_parameters("recipes"))


# The server -----------------------------------------------------------------------------------------------------


def start_server(folder: Path, max_batch_size: int, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`serve` in a subprocess on a free port of 127.0.0.1, once it answers; returns the process and its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import torch; torch.set_num_threads({threads}); "
        "from domain_experts import DomainExpertsForCausalLM; from domain_experts.serving import serve; "
        "serve(DomainExpertsForCausalLM.from_pretrained({folder!r}), port={port}, max_batch_size={batch}, "
        "log_level='warning')"
    ).format(threads=threads, folder=str(folder), port=port, batch=max_batch_size)
    log = open(log_path, "w")
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}; see {log_path}.")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx2.TransportError:
            time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"The server did not start in 10 minutes; see {log_path}.")


async def one_request(client: httpx2.AsyncClient, url: str, index: int, max_tokens: int) -> dict:
    """One streaming completion; the time to its first text and its generated tokens (the server's usage count)."""
    route, prompt = request_plan(index)
    body = {"model": route, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first_token, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first_token is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first_token = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"tokens": tokens, "first_token": first_token, "latency": time.perf_counter() - start}


async def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients sending `ceil(requests / clients)` requests each, one after the other.

    The clients are asyncio tasks of one thread with a plain HTTP client (as vLLM's serving benchmark does), so that
    they take as little as possible of the CPU the server runs on.
    """
    per_client = math.ceil(requests / clients)
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(timeout=3600, limits=limits) as client:

        async def work(client_index: int) -> list[dict]:
            return [await one_request(client, url, round_ * clients + client_index, max_tokens)
                    for round_ in range(per_client)]

        start = time.perf_counter()
        results = [result for results in await asyncio.gather(*(work(i) for i in range(clients)))
                   for result in results]
        seconds = time.perf_counter() - start
    first_tokens = sorted(r["first_token"] for r in results if r["first_token"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "first_token_median_s": statistics.median(first_tokens) if first_tokens else None,
        "first_token_p90_s": first_tokens[min(len(first_tokens) - 1, int(0.9 * len(first_tokens)))]
        if first_tokens else None,
        "latency_median_s": statistics.median(r["latency"] for r in results),
    }


def measure_server(folder: Path, max_batch_size: int, args, work_dir: Path) -> list[dict]:
    process, url = start_server(folder, max_batch_size, args.threads, work_dir / f"server_batch{max_batch_size}.log")
    try:
        asyncio.run(run_clients(url, clients=2, requests=2, max_tokens=4))  # warm-up
        rows = []
        for clients in args.clients:
            row = asyncio.run(run_clients(url, clients, max(args.requests, clients), args.max_tokens))
            row["method"] = SERVER if max_batch_size > 1 else ONE_AT_A_TIME
            print(format_row(row), flush=True)
            rows.append(row)
        return rows
    finally:
        process.terminate()
        process.wait(60)


# Offline generate -----------------------------------------------------------------------------------------------


def count_generated(sequences: torch.Tensor, prompt_length: int, eos_ids: set[int]) -> int:
    """Generated tokens of a batch from `generate`, up to and including each row's first end-of-sequence token."""
    total = 0
    for row in sequences[:, prompt_length:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def eos_ids_of(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def run_offline(generate_batch, clients: int, requests: int, eos_ids: set[int]) -> dict:
    """Batches of `clients` planned requests through `generate_batch(indices) -> (sequences, prompt_length)`."""
    batches = math.ceil(max(requests, clients) / clients)
    generate_batch(list(range(min(2, clients))))  # warm-up
    tokens, latencies = 0, []
    start = time.perf_counter()
    for batch in range(batches):
        batch_start = time.perf_counter()
        sequences, prompt_length = generate_batch([batch * clients + i for i in range(clients)])
        latencies.append(time.perf_counter() - batch_start)
        tokens += count_generated(sequences, prompt_length, eos_ids)
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": batches * clients, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "first_token_median_s": None, "first_token_p90_s": None,
            "latency_median_s": statistics.median(latencies)}


def measure_domain_experts_generate(folder: Path, args) -> list[dict]:
    model = DomainExpertsForCausalLM.from_pretrained(folder).eval()
    model.tokenizer.padding_side = "left"
    eos_ids = eos_ids_of(model.generation_config)

    def generate_batch(indices):
        plans = [request_plan(i) for i in indices]
        batch = model.tokenizer([prompt for _, prompt in plans],
                                domain=[route if route != "base" else None for route, _ in plans], padding=True,
                                return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=args.max_tokens, do_sample=False,
                                    pad_token_id=model.tokenizer.pad_token_id)
        return output, batch["input_ids"].shape[1]

    return [{**run_offline(generate_batch, clients, args.requests, eos_ids), "method": OFFLINE}
            for clients in args.clients]


def measure_peft(domain_parameters: int, args) -> tuple[list[dict], dict]:
    """peft's mixed-adapter generate, with a LoRA on every projection of rank giving about `domain_parameters`."""
    from peft import LoraConfig, get_peft_model

    backbone, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    per_rank = sum(module.in_features + module.out_features for name, module in backbone.named_modules()
                   if name.rsplit(".", 1)[-1] in LORA_TARGETS)
    rank = max(1, round(domain_parameters / per_rank))
    model = get_peft_model(backbone, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS),
                           adapter_name="recipes")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained LoRA's B is not zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(1e-3 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    lora_parameters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    eos_ids = eos_ids_of(model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))

    def generate_batch(indices):
        plans = [request_plan(i) for i in indices]
        batch = tokenizer([prompt for _, prompt in plans], return_tensors="pt", padding=True)
        adapters = ["recipes" if route == "recipes" else "__base__" for route, _ in plans]
        with torch.no_grad():
            output = model.generate(**batch, adapter_names=adapters, max_new_tokens=args.max_tokens, do_sample=False,
                                    pad_token_id=pad)
        return output, batch["input_ids"].shape[1]

    rows = [{**run_offline(generate_batch, clients, args.requests, eos_ids), "method": PEFT}
            for clients in args.clients]
    return rows, {"rank": rank, "parameters": lora_parameters}


# Report ---------------------------------------------------------------------------------------------------------


def seconds_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def format_row(row: dict) -> str:
    return (f"| {row['method']} | {row['clients']} | {row['requests']} | {row['tokens']} | "
            f"{row['tokens_per_second']:.1f} | {seconds_or_dash(row['first_token_median_s'])} | "
            f"{seconds_or_dash(row['first_token_p90_s'])} | {seconds_or_dash(row['latency_median_s'])} |")


def ratios(rows: list[dict]) -> dict:
    """Throughput of the batching server over each other method, at each number of clients."""
    speed = {(row["method"], row["clients"]): row["tokens_per_second"] for row in rows}
    result = {}
    for (method, clients), value in speed.items():
        if method != SERVER and (SERVER, clients) in speed:
            result[f"{SERVER} / {method}, {clients} clients"] = speed[(SERVER, clients)] / value
    return result


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        f"SmolLM2-135M-Instruct, a {settings['num_blocks']}-block `recipes` domain "
        f"({results['domain_parameters']:,} parameters) vs a LoRA of rank {results['lora']['rank']} "
        f"({results['lora']['parameters']:,} parameters); half the requests `recipes`, half `base`; greedy, "
        f"{settings['max_tokens']} new tokens at most; server and offline runs on {settings['threads']} torch threads "
        f"({results['machine']['cpu_count']} CPUs).",
        "",
        "| method | clients (batch) | requests | tokens | tokens/s | first token, median | first token, p90 | "
        "latency, median |",
        "|---|---|---|---|---|---|---|---|",
        *[format_row(row) for row in results["rows"]],
        "",
        "| ratio of tokens/s | value |",
        "|---|---|",
        *[f"| {name} | {value:.2f}x |" for name, value in results["ratios"].items()],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                        help="numbers of concurrent clients (and offline batch sizes) to measure")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per measurement (at least one per client; default: 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request at most (default: 64)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching server's cap (default: 16)")
    parser.add_argument("--num-blocks", type=int, default=4, help="expansion blocks of the domain (default: 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and offline runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["one-at-a-time", "peft", "offline"],
                        help="measurements to leave out")
    parser.add_argument("--work-dir", default="runs/serve_throughput", help="where the model and server logs go")
    parser.add_argument("--results-dir", default="benchmarks/results", help="where the results go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    folder, domain_parameters = build_model(work_dir, args.num_blocks)
    print("| method | clients | requests | tokens | tokens/s | first token, median | first token, p90 | latency |")
    rows = measure_server(folder, args.max_batch_size, args, work_dir)
    if "one-at-a-time" not in args.skip:
        rows += measure_server(folder, 1, args, work_dir)
    if "offline" not in args.skip:
        rows += measure_domain_experts_generate(folder, args)
        print(*[format_row(row) for row in rows if row["method"] == OFFLINE], sep="\n", flush=True)
    lora = {"rank": None, "parameters": None}
    if "peft" not in args.skip:
        peft_rows, lora = measure_peft(domain_parameters, args)
        rows += peft_rows
        print(*[format_row(row) for row in peft_rows], sep="\n", flush=True)

    results = {
        "settings": {key: value for key, value in vars(args).items() if key not in ("work_dir", "results_dir")},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
        "domain_parameters": domain_parameters,
        "lora": lora,
        "rows": rows,
        "ratios": ratios(rows),
    }
    results_dir = Path(args.results_dir)
    write_file_atomically(results_dir / "serve_throughput.json", json.dumps(results, indent=2) + "\n")
    write_file_atomically(results_dir / "serve_throughput.md", markdown(results))
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
