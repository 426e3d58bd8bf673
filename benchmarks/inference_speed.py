"""What serving domains costs at inference, side by side on SmolLM2-135M: the bare backbone, this model with base rows
only, with a mixed batch (half the rows in a 4-block domain), the same with routed adapters next to the blocks, and
peft's mixed-adapter batch (`adapter_names`) with a LoRA of the same parameter count as the 4-block domain.

    python benchmarks/inference_speed.py                # prefill 8 x 256 and greedy generation 8 x 32, 7 rounds
    python benchmarks/inference_speed.py --rounds 15 --results-dir benchmarks/results

Every round times each configuration once, in a rotating order, and divides its time by the bare backbone's in the
same round; the reported ratio is the median over rounds, with the spread (min-max) beside it. The compute ideal of a
mixed batch is `1 + share of domain rows x blocks / layers` (the blocks are the only extra work). Also reported: the
parameters of the composed model, the KV cache of a mixed generation (expansion layers hold their domain's rows
only), and memory: the bytes of each configuration's weights, and the peak resident memory one prefill and one
generation take above them, each measured in a fresh process (Linux: the process's resident high-water mark, reset
after a warm-up call, with glibc returning freed memory at once so that the mark follows what is alive).
Results: benchmarks/results/inference_speed.{json,md,png}.
"""

import argparse
import copy
import gc
import json
import multiprocessing
import os
import statistics
import textwrap
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from domain_experts import AdapterConfig, DomainExpertsForCausalLM
from domain_experts.data import load_texts
from domain_experts.files import write_file_atomically
from domain_experts.modeling_domain_experts import CACHE_NAME
from domain_experts.smollm2 import load_smollm2


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_rank_matching(backbone, num_parameters: int) -> int:
    """The LoRA rank over LORA_TARGETS of every layer whose trainable parameter count is closest to `num_parameters`."""
    per_rank = sum(module.in_features + module.out_features for name, module in backbone.named_modules()
                   if name.rsplit(".", 1)[-1] in LORA_TARGETS)
    return max(1, round(num_parameters / per_rank))


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class Setup:
    """Everything the timings run on: the models, the batch, and the configurations to time."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(0)
        backbone, tokenizer = load_smollm2()
        bare = copy.deepcopy(backbone)
        model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
        model.add_domain("recipes", num_blocks=args.blocks)
        model.add_domain("recipes_adapters", num_blocks=args.blocks, adapters=AdapterConfig(r=args.adapter_rank))
        with torch.no_grad():  # trained-looking domains: the same work as identities, but not a trivial case
            for name in model.domain_names:
                for parameter in model.domain_parameters(name):
                    parameter.add_(torch.randn_like(parameter) * 1e-3)
        domain_parameters = sum(p.numel() for p in model.domain_parameters("recipes"))
        rank = lora_rank_matching(bare, domain_parameters)
        lora = get_peft_model(copy.deepcopy(bare), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                                              init_lora_weights=False), adapter_name="recipes")
        lora.eval()
        lora_parameters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)

        half = args.batch_size // 2

        def windows(corpus: str, count: int) -> torch.Tensor:
            """`count` rows of `--prefill-length` consecutive tokens of a corpus's test texts."""
            ids = torch.tensor(tokenizer("\n\n".join(load_texts(corpus, "test")))["input_ids"])
            return ids[: count * args.prefill_length].view(count, args.prefill_length)

        ids = torch.cat([windows("stories", half), windows("recipes", args.batch_size - half)])
        domain_ids = torch.tensor([-1] * half + [0] * (args.batch_size - half))
        adapter_domain_ids = torch.tensor([-1] * half + [1] * (args.batch_size - half))
        routes = ["__base__"] * half + ["recipes"] * (args.batch_size - half)
        prompt = ids[:, : args.prompt_length]
        generate = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

        def prefill(m, **kwargs):
            return lambda: m(input_ids=ids, use_cache=False, **kwargs)

        def gen(m, **kwargs):
            return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **generate, **kwargs)

        # Each configuration: the model it runs, and what it runs with (the same for prefill and generation).
        runs = {
            "bare backbone": (bare, {}),
            "base rows": (model, {}),
            "mixed batch (half domain rows)": (model, {"domain_ids": domain_ids}),
            f"mixed batch, domain with rank-{args.adapter_rank} adapters": (model, {"domain_ids": adapter_domain_ids}),
            "peft LoRA, mixed batch": (lora, {"adapter_names": routes}),
        }
        configurations = {name: (prefill(m, **kwargs), gen(m, **kwargs)) for name, (m, kwargs) in runs.items()}
        self.model_of = {name: m for name, (m, _) in runs.items()}
        self.bare, self.model = bare, model
        self.configurations, self.ids, self.prompt, self.half = configurations, ids, prompt, half
        self.domain_ids, self.rank = domain_ids, rank
        self.domain_parameters, self.lora_parameters = domain_parameters, lora_parameters

    def weights_bytes(self, name: str) -> int:
        """Bytes of the parameters and buffers of the model configuration `name` runs (shared tensors once)."""
        model = self.model_of[name]
        tensors = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}
        return sum(tensors.values())


def resident_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (the high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_in_child(args: argparse.Namespace, name: str, phase_index: int, results) -> None:
    """Run in a fresh process: the peak resident bytes one call of configuration `name`, phase `phase_index`, takes
    above the resident bytes before it, put on the `results` queue."""
    torch.set_num_threads(args.threads)
    setup = Setup(args)
    run = setup.configurations[name][phase_index]
    with torch.no_grad():
        run()  # once-only allocations (thread pools, kernel workspaces) are not what this configuration costs per call
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to what is resident now
        before = resident_bytes("VmRSS")
        run()
        results.put(resident_bytes("VmHWM") - before)


def peak_memory(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, int]] | None:
    """For each configuration and phase, the peak resident memory of one call above the loaded models, each measured
    in a fresh process; None where the process's high-water mark cannot be read and reset (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        print("No /proc/self/clear_refs (not Linux): peak memory is not measured.")
        return None
    context = multiprocessing.get_context("spawn")
    # Fixed thresholds: glibc then hands every large block back to the system when it is freed, so the resident
    # high-water mark counts what was alive at the peak, not what the allocator kept from earlier calls.
    malloc_settings = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    saved = {key: os.environ.get(key) for key in malloc_settings}
    os.environ.update(malloc_settings)
    peaks = {"prefill": {}, "generation": {}}
    try:
        for name in names:
            for phase_index, phase in enumerate(peaks):
                results = context.Queue()
                child = context.Process(target=peak_memory_in_child, args=(args, name, phase_index, results))
                child.start()
                child.join()  # the queue holds one small int: joining first cannot block on it
                if child.exitcode != 0:
                    raise RuntimeError(f"measuring the peak memory of {name!r} ({phase}) failed: see its traceback above")
                peaks[phase][name] = results.get()
                print(f"peak memory of {name}, {phase}: {peaks[phase][name] / 2**20:.1f} MiB", flush=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (half of them domain rows)")
    parser.add_argument("--prefill-length", type=int, default=256, help="tokens per row in the prefill forward")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per row before generating")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each row generates (greedy)")
    parser.add_argument("--blocks", type=int, default=4, help="expansion blocks of the domain")
    parser.add_argument("--adapter-rank", type=int, default=16,
                        help="rank of the routed adapters (on every projection) of the domain timed with adapters")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of timings (each times every configuration)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurements")
    parser.add_argument("--results-dir", default="benchmarks/results", help="where the JSON, markdown and plot go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup(args)
    configurations, model, bare, ids, prompt = setup.configurations, setup.model, setup.bare, setup.ids, setup.prompt
    half, domain_ids = setup.half, setup.domain_ids
    names = list(configurations)
    with torch.no_grad():
        for name in names:  # warm-up, and the outputs' agreement where it must hold
            for run in configurations[name]:
                run()
        assert torch.equal(model(input_ids=ids[:half]).logits[..., : model.config.backbone_vocab_size],
                           bare(input_ids=ids[:half]).logits), "base rows must be the backbone's"
        timings = {phase: {name: [] for name in names} for phase in ("prefill", "generation")}
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for phase_index, phase in enumerate(timings):
                for name in order:
                    timings[phase][name].append(timed(configurations[name][phase_index]))
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        mixed_cache = getattr(model(input_ids=prompt, domain_ids=domain_ids, use_cache=True), CACHE_NAME)
        base_cache = getattr(model(input_ids=prompt, use_cache=True), CACHE_NAME)

    layers = model.config.num_backbone_layers
    ideal = 1 + (args.batch_size - half) / args.batch_size * args.blocks / layers
    result = {"args": vars(args), "ideal_mixed_ratio": ideal, "lora_rank": setup.rank,
              "parameters": {"backbone": sum(p.numel() for p in bare.parameters()), "domain": setup.domain_parameters,
                             "domain_with_adapters": sum(p.numel() for p in model.domain_parameters("recipes_adapters")),
                             "lora": setup.lora_parameters},
              "weights_bytes": {name: setup.weights_bytes(name) for name in names},
              "kv_cache_bytes": {"base rows": cache_bytes(base_cache), "mixed batch": cache_bytes(mixed_cache),
                                 "expansion layers": cache_bytes(mixed_cache) - cache_bytes(base_cache)},
              "phases": {}}
    for phase, per_name in timings.items():
        bare_times = per_name["bare backbone"]
        result["phases"][phase] = {
            name: {"median_seconds": statistics.median(times),
                   "ratio": statistics.median(t / b for t, b in zip(times, bare_times)),
                   "ratio_min": min(t / b for t, b in zip(times, bare_times)),
                   "ratio_max": max(t / b for t, b in zip(times, bare_times))}
            for name, times in per_name.items()
        }
    del setup, configurations, model, bare
    gc.collect()
    result["peak_memory_per_call_bytes"] = None if args.no_memory else peak_memory(args, names)
    write_results(result, Path(args.results_dir))


def write_results(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_file_atomically(folder / "inference_speed.json", json.dumps(result, indent=2) + "\n")
    args = result["args"]
    lines = [f"SmolLM2-135M, {args['blocks']}-block domain ({result['parameters']['domain']:,} parameters) vs peft LoRA "
             f"rank {result['lora_rank']} ({result['parameters']['lora']:,}); ratios to the bare backbone, median over "
             f"{args['rounds']} rounds (min-max). Compute ideal of the mixed batch: {result['ideal_mixed_ratio']:.3f}x.",
             "", f"| configuration | prefill {args['batch_size']} x {args['prefill_length']} | generation "
             f"{args['batch_size']} x {args['new_tokens']} |", "|---|---|---|"]
    for name in result["phases"]["prefill"]:
        cells = [f"{p[name]['ratio']:.3f}x ({p[name]['ratio_min']:.2f}-{p[name]['ratio_max']:.2f}), "
                 f"{p[name]['median_seconds']:.3f} s" for p in (result["phases"]["prefill"], result["phases"]["generation"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    kv = result["kv_cache_bytes"]
    lines += ["", f"KV cache after the {args['prompt_length']}-token prompt: base rows {kv['base rows']:,} bytes, mixed "
              f"batch {kv['mixed batch']:,} bytes (expansion layers {kv['expansion layers']:,}, for half the rows)."]
    peaks, mib = result["peak_memory_per_call_bytes"], 2**20
    if peaks is not None:
        lines += ["", "Memory (MiB): the weights each configuration runs (the composed model holds the backbone and both "
                  "domains), and the peak resident memory one call takes above the loaded process, each call measured "
                  "after a warm-up in a fresh process.", "",
                  "| configuration | weights | prefill peak | generation peak | weights + larger peak |", "|---|---|---|---|---|"]
        for name, weights in result["weights_bytes"].items():
            prefill, generation = peaks["prefill"][name], peaks["generation"][name]
            lines.append(f"| {name} | {weights / mib:.1f} | {prefill / mib:.1f} | {generation / mib:.1f} | "
                         f"{(weights + max(prefill, generation)) / mib:.1f} |")
    write_file_atomically(folder / "inference_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot.")
        return
    names = list(result["phases"]["prefill"])
    labels = [textwrap.fill(name, 16) for name in names]
    colors = ["#888", "#4c72b0", "#55a868", "#8172b3", "#c44e52"][: len(names)]
    figure, axes = plt.subplots(1, 3 if peaks is not None else 2, figsize=(16, 4.5))
    for axis, (phase, per_name) in zip(axes, result["phases"].items()):
        ratios = [per_name[n]["ratio"] for n in names]
        errors = [[r - per_name[n]["ratio_min"] for r, n in zip(ratios, names)],
                  [per_name[n]["ratio_max"] - r for r, n in zip(ratios, names)]]
        axis.bar(range(len(names)), ratios, yerr=errors, capsize=4, color=colors)
        axis.axhline(result["ideal_mixed_ratio"], color="#55a868", linestyle="--", linewidth=1, label="mixed ideal")
        axis.set_xticks(range(len(names)), labels, fontsize=7)
        axis.set_title(f"{phase} time")
        axis.set_ylabel("time / bare backbone")
        axis.legend(loc="upper left", fontsize=8)
    if peaks is not None:
        axis = axes[2]
        weights = [result["weights_bytes"][n] / mib for n in names]
        peak = [max(peaks["prefill"][n], peaks["generation"][n]) / mib for n in names]
        axis.bar(range(len(names)), weights, color=colors, label="weights")
        axis.bar(range(len(names)), peak, bottom=weights, color=colors, alpha=0.4, hatch="//",
                 label="peak of one call above them")
        axis.set_xticks(range(len(names)), labels, fontsize=7)
        axis.set_title("memory")
        axis.set_ylabel("MiB")
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "inference_speed.png", dpi=120)


if __name__ == "__main__":
    main()
