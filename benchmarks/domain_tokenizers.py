"""Issue 15: what a domain's own tokens buy on a pretrained backbone, per corpus, side by side in one run.

    python benchmarks/domain_tokenizers.py                      # recipes and stories on SmolLM2-135M
    python benchmarks/domain_tokenizers.py --corpora recipes --steps 200 --new-tokens 1000 2000

For each corpus, two domains of --num-blocks blocks are added to the backbone (SmolLM2-135M-Instruct unless
--backbone says otherwise) and trained alike (the library's `train`, the same steps, rows and learning rate): one with
tokens of its own (`--new-tokens` numbers tried, the one reading the validation split best before training kept by
`domain_experts.token_init.add_domain_with_tokens`, none if none is within --token-tolerance (1%) of the domain without
them, started and saved by `add_domain_with_tokens`), one without (added by `train`). The arm with tokens trains from
its saved start once per `--token-learning-rates` value (the rate of its token rows, `--token-learning-rate` of
`train`; the other parameters keep `--learning-rate`), and the run reading the first `--validation-texts` validation
texts best is the one measured. Reported per corpus:

- step 0: validation bits per character before training, of the bare backbone, of the domain without tokens of its
  own, and of the domain with each number of tokens tried (started by `token_init`'s default: distilled input rows,
  fitted output rows and biases);
- validation bits per character after training: without tokens, and with them at each token learning rate tried;
- tokens per character of the test split: the backbone's tokenizer against the domain's;
- test bits per character after training, with and without the tokens (standard errors over texts; the paired
  difference on the same texts), on the same characters of each text (`token_init.same_characters`);
- greedy generation after the first words of test texts (one batch, a fixed number of new tokens), timed in
  alternation (median of `--gen-repeats`): characters per second of what each arm wrote (the two arms write different
  texts, so this mixes speed with content), and characters per second on the domain's own text, from the same timing:
  1 / (seconds per generated token x tokens per character of the test split).

Writes benchmarks/results/domain_tokenizers.{json,md}: the corpora of this run replace theirs there, the others are
kept, each with the command that measured it. The test split decides nothing.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accelerate.utils import set_seed

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import language_modeling
from domain_experts.files import write_file_atomically
from domain_experts.token_init import TokenInitConfig, add_domain_with_tokens, same_characters
from domain_experts.train import TrainingConfig, train

# Bits per character text by text, with standard errors over texts, exactly as the research comparison measures them.
from compare_methods import bpc_with_error, paired_difference, text_bits


def tokens_per_character(tokenizer, texts: list[str]) -> float:
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return sum(map(len, ids)) / sum(map(len, texts))


@torch.no_grad()
def generate(model, corpus: str, prompts: list[str], new_tokens: int) -> tuple[float, list[str]]:
    """Seconds to generate `new_tokens` greedy tokens after each prompt (one batch), and the texts generated."""
    model.tokenizer.padding_side = "left"
    batch = model.tokenizer(prompts, domain=corpus, padding=True, return_tensors="pt")
    start = time.perf_counter()
    output = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    return seconds, model.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def trained_domain(corpus: str, args, folder: Path, start: Path | None = None,
                   token_learning_rate: float | None = None):
    """The domain `corpus` trained by the library's `train` (both arms alike): the one of the model saved in `start`,
    or, without one, a domain of --num-blocks blocks that `train` adds to the backbone itself (`--add-domain`)."""
    return train(TrainingConfig(
        output_dir=str(folder), model=str(start) if start else args.backbone, domain=corpus, add_domain=start is None,
        num_blocks=args.num_blocks if start is None else None, train_file=str(corpus_path(corpus, "train")),
        validation_file=str(corpus_path(corpus, "validation")), block_size=args.block_size,
        batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.learning_rate,
        token_learning_rate=token_learning_rate, control_token_dropout=0.0, seed=args.seed, overwrite=True)).eval()


def start_with_tokens(corpus: str, args, folder: Path) -> dict:
    """The domain with tokens of its own before training, saved in `folder` (so that each token learning rate trains
    from the same start): chosen and started by `add_domain_with_tokens` as `domain-experts train --new-tokens` does
    (seeded alike, on the first 100 validation texts). Returns the record of how the tokens were chosen and started."""
    model = DomainExpertsForCausalLM.from_backbone(args.backbone)
    set_seed(args.seed)
    token_init = TokenInitConfig(seed=args.seed, distill_steps=args.token_init_distill_steps,
                                 distill_length=args.token_init_distill_length)
    record = add_domain_with_tokens(model, corpus, load_texts(corpus, "train"), load_texts(corpus, "validation")[:100],
                                    args.new_tokens, token_init, tolerance=args.token_tolerance,
                                    num_blocks=args.num_blocks)
    model.save_pretrained(folder)
    return record


def generation_speed(models: dict, corpus: str, test: list[str], per_character: dict, args) -> dict:
    """Greedy generation of both arms after the first words of test texts, timed in alternation (see the module
    docstring): characters per second of what each wrote, and on the corpus's own text."""
    prompts = [" ".join(text.split()[: args.prompt_words]) for text in test[: args.gen_batch]]
    for model in models.values():
        generate(model, corpus, prompts, 2)  # warm-up
    seconds, samples = {arm: [] for arm in models}, {}
    for repeat in tqdm(range(args.gen_repeats), desc=f"{corpus}: timing generation", unit="round"):
        for arm in (("with", "without") if repeat % 2 == 0 else ("without", "with")):
            elapsed, texts = generate(models[arm], corpus, prompts, args.gen_tokens)
            seconds[arm].append(elapsed)
            samples[arm] = texts
    characters = {arm: sum(map(len, texts)) for arm, texts in samples.items()}
    speed = {arm: characters[arm] / statistics.median(seconds[arm]) for arm in models}
    # Free generation writes other texts in each arm; on the corpus's own text an arm decodes one token per
    # generation step, and spends its tokenizer's tokens per character.
    generated = len(prompts) * args.gen_tokens
    on_text = {arm: generated / statistics.median(seconds[arm]) / per_character[arm] for arm in models}
    return {"characters_per_second": speed, "seconds": seconds, "characters": characters,
            "speedup": speed["with"] / speed["without"], "samples": {a: s[:2] for a, s in samples.items()},
            "tokens_generated": generated, "characters_per_second_on_text": on_text,
            "speedup_on_text": on_text["with"] / on_text["without"], "repeats": args.gen_repeats}


def retime_generation(corpus: str, earlier: dict, args) -> dict:
    """`earlier` (a corpus's results) with its generation timed again, with this run's generation settings, on the
    arms its run trained and saved in --work-dir (the arm with tokens at the token learning rate it chose)."""
    work = Path(args.work_dir) / corpus
    rate = earlier["token_learning_rate_chosen"]
    models = {"without": DomainExpertsForCausalLM.from_pretrained(work / "without" / "model"),
              "with": DomainExpertsForCausalLM.from_pretrained(work / f"with-token-lr-{rate:g}" / "model")}
    per_character = {"without": earlier["tokens_per_character"]["backbone"],
                     "with": earlier["tokens_per_character"]["domain"]}
    test = load_texts(corpus, "test")[: args.test_texts or None]
    return {**earlier, "generation": generation_speed(models, corpus, test, per_character, args),
            "generation_command": "python " + " ".join(sys.argv)}


def measure(corpus: str, args) -> dict:
    work = Path(args.work_dir) / corpus
    validation, test = load_texts(corpus, "validation"), load_texts(corpus, "test")[: args.test_texts or None]
    start = work / "with-start"
    start_record = start_with_tokens(corpus, args, start)
    models = {"without": trained_domain(corpus, args, work / "without")}
    # The arm with tokens trains at each token learning rate given; the one reading the validation texts best is kept.
    # Without tokens of its own kept, its token rows are a control token's only, and one run is enough.
    rates = args.token_learning_rates if start_record["new_tokens"] else [args.learning_rate]
    length = TokenInitConfig().max_length  # validation texts are read as the step-0 check reads them
    chosen_on = same_characters(models["without"], validation[:args.validation_texts], length)
    tried_rates, best = {}, None
    for rate in rates:
        model = trained_domain(corpus, args, work / f"with-token-lr-{rate:g}", start, rate)
        tried_rates[f"{rate:g}"] = bpc = language_modeling(model, chosen_on, corpus, max_length=length)[
            "bits_per_character"]
        if best is None or bpc < best[0]:
            best = (bpc, rate, model)
        del model
    models["with"] = best[2]
    validation_after = {"without": language_modeling(models["without"], chosen_on, corpus, max_length=length)[
        "bits_per_character"], "with": tried_rates}
    record = models["with"].config.domains[corpus].get("token_init", {})
    chosen = len(models["with"].config.domains[corpus]["tokens"]) - 1
    step0 = dict(record.get("validation_bits_per_character", {}))
    step0["bare backbone"] = language_modeling(  # on the validation texts the numbers tried were measured on
        models["without"], validation[: record.get("validation_texts")], None,
        max_length=record.get("settings", {}).get("max_length", 256))["bits_per_character"]
    # Both arms read the same characters of each text: cut by each arm's own tokens, the one with tokens of its own
    # would read further into long texts.
    cut_test = same_characters(models["without"], test, args.max_length)
    bits = {arm: text_bits(model, cut_test, corpus, args.max_length, f"{corpus} test, {arm} tokens")
            for arm, model in models.items()}
    after = {arm: bpc_with_error(measured) for arm, measured in bits.items()}
    difference = paired_difference(bits["with"], bits["without"])

    per_character = {"without": tokens_per_character(models["without"].tokenizer.tokenizer_for(None), test),
                     "with": tokens_per_character(models["with"].tokenizer.tokenizer_for(corpus), test)}
    return {
        "new_tokens_tried": args.new_tokens, "new_tokens_chosen": chosen, "step0_validation_bpc": step0,
        "validation_bpc_after_training": validation_after, "token_learning_rate_chosen": best[1],
        "tokens_per_character": {"backbone": per_character["without"], "domain": per_character["with"]},
        "test_bpc": {arm: {"value": v, "standard_error": e} for arm, (v, e) in after.items()},
        "test_bpc_difference": {"value": difference[0], "standard_error": difference[1]},
        "generation": generation_speed(models, corpus, test, per_character, args),
        "token_init": record,
    }


def training_budget(args: dict) -> str:
    backbone = "SmolLM2-135M" if args["backbone"] == "smollm2" else args["backbone"]
    return (f"{backbone}, {args['num_blocks']}-block domains trained {args['steps']} steps of {args['batch_size']} x "
            f"{args['block_size']} tokens at learning rate {args['learning_rate']:g}")


def markdown(results: dict) -> str:
    budgets = {training_budget(r["args"]) for r in results["corpora"].values()}
    budget = budgets.pop() if len(budgets) == 1 else "Domains trained as each corpus's command says"
    lines = [f"{budget}, with and without tokens of their own (the number of tokens chosen on validation among "
             "those tried).",
             "", "| corpus | tokens chosen | step-0 validation bpc: backbone / domain without / with tokens | tokens "
             "per char: backbone / domain | test bpc after training: without / with (paired difference) | free "
             "generation chars/s: without / with (speed-up) | chars/s on the test text: without / with (speed-up) | "
             "validation bpc after training: without / with, per token learning rate |",
             "|---|---|---|---|---|---|---|---|"]
    for corpus, r in results["corpora"].items():
        step0 = r["step0_validation_bpc"]
        tried = ", ".join(f"{k}: {v:.4f}" for k, v in step0.items() if k not in ("bare backbone", "none"))
        t, d, g = r["test_bpc"], r["test_bpc_difference"], r["generation"]
        text_speed = g["characters_per_second_on_text"]
        v = r["validation_bpc_after_training"]
        rates = ", ".join((f"**{k}: {b:.4f}**" if float(k) == r["token_learning_rate_chosen"] else f"{k}: {b:.4f}")
                          for k, b in v["with"].items())
        lines.append(
            f"| {corpus} | {r['new_tokens_chosen']} | {step0['bare backbone']:.4f} / "
            f"{step0.get('none', float('nan')):.4f}"
            f" / {tried} | {r['tokens_per_character']['backbone']:.4f} / {r['tokens_per_character']['domain']:.4f} | "
            f"{t['without']['value']:.4f} ± {t['without']['standard_error']:.4f} / {t['with']['value']:.4f} ± "
            f"{t['with']['standard_error']:.4f} ({d['value']:+.4f} ± {d['standard_error']:.4f}) | "
            f"{g['characters_per_second']['without']:.1f} / {g['characters_per_second']['with']:.1f} "
            f"({g['speedup']:.3f}x) | {text_speed['without']:.1f} / {text_speed['with']:.1f} "
            f"({g['speedup_on_text']:.3f}x) | {v['without']:.4f} / {rates} |")
    lines += ["", "Measured by:"]
    lines += [f"- {corpus} (numbers of tokens tried: {', '.join(map(str, r['args']['new_tokens']))}): `{r['command']}`"
              + (f"; generation timed again ({r['generation']['repeats']} rounds): `{r['generation_command']}`"
                 if r.get("generation_command") else "")
              for corpus, r in results["corpora"].items()]
    return "\n".join(lines) + "\n"


def earlier_corpora(path: Path) -> dict:
    """The corpora an earlier run measured (each with the command and arguments that measured it), from its results
    file; a run replaces the corpora it measures and keeps the others."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    # Files written before the corpora carried their own command hold one command for all.
    return {corpus: {"command": earlier.get("command"), "args": earlier.get("args"), **result}
            for corpus, result in earlier["corpora"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2",
                        help="the backbone: smollm2 (SmolLM2-135M-Instruct, offline from its PyPI wheel), or a causal "
                             "LM folder or Hub id")
    parser.add_argument("--corpora", nargs="+", default=["recipes", "stories"], help="the domains to measure")
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[1000, 2000],
                        help="numbers of tokens of its own to try (the best on validation is kept)")
    parser.add_argument("--token-tolerance", type=float, default=0.01,
                        help="keep the best number of tokens if it reads the validation text within this (relative) of "
                             "the domain without them before training; a large value keeps it whatever it reads, to "
                             "measure what training makes of it")
    parser.add_argument("--token-learning-rates", nargs="+", type=float, default=None,
                        help="learning rates of the token rows of the arm with tokens, each tried in a run of its own "
                             "(the best on the validation texts is kept; default: --learning-rate)")
    parser.add_argument("--token-init-distill-steps", type=int, default=TokenInitConfig.distill_steps,
                        help="Token Distillation steps of the new tokens' input rows (TokenInitConfig.distill_steps)")
    parser.add_argument("--token-init-distill-length", type=int, default=TokenInitConfig.distill_length,
                        help="domain tokens per text piece in distillation (TokenInitConfig.distill_length)")
    parser.add_argument("--validation-texts", type=int, default=100,
                        help="first N validation texts that choose the token learning rate")
    parser.add_argument("--num-blocks", type=int, default=4, help="expansion blocks of both domains")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each domain")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per row")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="the learning rate of both arms")
    parser.add_argument("--max-length", type=int, default=512, help="tokens kept per test text")
    parser.add_argument("--test-texts", type=int, default=0, help="first N test texts (0: all)")
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts generated in one batch")
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--gen-repeats", type=int, default=4, help="timed generations per arm, alternating")
    parser.add_argument("--prompt-words", type=int, default=6, help="words of a test text that prompt a generation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training runs")
    parser.add_argument("--retime-generation", action="store_true",
                        help="only time generation again (with these --gen-* settings) on the arms an earlier run "
                             "trained and saved in --work-dir, replacing its generation numbers in the results")
    parser.add_argument("--work-dir", default="runs/domain_tokenizers", help="where the trained domains go")
    parser.add_argument("--results-dir", default="benchmarks/results", help="where the json and md go")
    args = parser.parse_args()
    args.token_learning_rates = args.token_learning_rates or [args.learning_rate]
    # Checked before hours of token starts and training, not when the first run with them begins.
    if min(args.token_learning_rates) <= 0 or args.learning_rate <= 0:
        parser.error("--learning-rate and --token-learning-rates must be positive.")
    if not args.token_tolerance >= 0:
        parser.error(f"--token-tolerance must be 0 or more, got {args.token_tolerance}.")
    out = Path(args.results_dir) / "domain_tokenizers"
    corpora = earlier_corpora(out.with_suffix(".json"))
    command = "python " + " ".join(sys.argv)
    for corpus in args.corpora:
        if args.retime_generation:
            if corpus not in corpora:
                parser.error(f"--retime-generation: {out.with_suffix('.json')} holds no results for {corpus}.")
            corpora[corpus] = retime_generation(corpus, corpora[corpus], args)
        else:
            corpora[corpus] = {"command": command, "args": vars(args), **measure(corpus, args)}
    results = {"corpora": corpora}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_file_atomically(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
