"""What serving domains costs at inference, side by side on SmolLM2-135M: the bare backbone, this model with base rows
only, with a mixed batch (half the rows in a 4-block domain), the same with routed adapters next to the blocks, and
peft's mixed-adapter batch (`adapter_names`) with a LoRA of the same parameter count as the 4-block domain.

    python benchmarks/inference_speed.py                # prefill 8 x 256 and greedy generation 8 x 32, 7 rounds
    python benchmarks/inference_speed.py --rounds 15 --results-dir benchmarks/results

Every round times each configuration once, in a rotating order, and divides its time by the bare backbone's in the
same round; the reported ratio is the median over rounds, with the spread (min-max) beside it. The compute ideal of a
mixed batch is `1 + share of domain rows x blocks / layers` (the blocks are the only extra work). Also reported: the
parameters of the composed model, and the KV cache of a mixed generation (expansion layers hold their domain's rows
only). Results: benchmarks/results/inference_speed.{json,md,png}.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from domain_experts import AdapterConfig, DomainExpertsForCausalLM
from domain_experts.data import load_texts
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
    parser.add_argument("--results-dir", default="benchmarks/results", help="where the JSON, markdown and plot go")
    args = parser.parse_args()
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
    control = model.control_token_id("recipes")
    domain_ids = torch.tensor([-1] * half + [0] * (args.batch_size - half))
    adapter_domain_ids = torch.tensor([-1] * half + [1] * (args.batch_size - half))
    routes = ["__base__"] * half + ["recipes"] * (args.batch_size - half)
    prompt = ids[:, : args.prompt_length]
    generate = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

    def prefill(m, **kwargs):
        return lambda: m(input_ids=ids, use_cache=False, **kwargs)

    def gen(m, **kwargs):
        return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **generate, **kwargs)

    configurations = {
        "bare backbone": (prefill(bare), gen(bare)),
        "base rows": (prefill(model), gen(model)),
        "mixed batch (half domain rows)": (prefill(model, domain_ids=domain_ids), gen(model, domain_ids=domain_ids)),
        f"mixed batch, domain with rank-{args.adapter_rank} adapters": (
            prefill(model, domain_ids=adapter_domain_ids), gen(model, domain_ids=adapter_domain_ids)),
        "peft LoRA, mixed batch": (prefill(lora, adapter_names=routes), gen(lora, adapter_names=routes)),
    }
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
        mixed_cache = model(input_ids=prompt, domain_ids=domain_ids, use_cache=True).past_key_values
        base_cache = model(input_ids=prompt, use_cache=True).past_key_values

    layers = model.config.num_backbone_layers
    ideal = 1 + (args.batch_size - half) / args.batch_size * args.blocks / layers
    result = {"args": vars(args), "ideal_mixed_ratio": ideal, "lora_rank": rank,
              "parameters": {"backbone": sum(p.numel() for p in bare.parameters()), "domain": domain_parameters,
                             "domain_with_adapters": sum(p.numel() for p in model.domain_parameters("recipes_adapters")),
                             "lora": lora_parameters},
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
    write_results(result, Path(args.results_dir))


def write_results(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inference_speed.json").write_text(json.dumps(result, indent=2) + "\n")
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
    (folder / "inference_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot.")
        return
    names = list(result["phases"]["prefill"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, (phase, per_name) in zip(axes, result["phases"].items()):
        ratios = [per_name[n]["ratio"] for n in names]
        errors = [[r - per_name[n]["ratio_min"] for r, n in zip(ratios, names)],
                  [per_name[n]["ratio_max"] - r for r, n in zip(ratios, names)]]
        axis.bar(range(len(names)), ratios, yerr=errors, capsize=4,
                 color=["#888", "#4c72b0", "#55a868", "#8172b3", "#c44e52"][: len(names)])
        axis.axhline(result["ideal_mixed_ratio"], color="#55a868", linestyle="--", linewidth=1, label="mixed ideal")
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(").replace(", ", ",\n") for n in names], fontsize=8)
        axis.set_title(phase)
        axis.set_ylabel("time / bare backbone")
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "inference_speed.png", dpi=120)


if __name__ == "__main__":
    main()
