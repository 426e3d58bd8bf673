"""Issue 7: full fine-tuning vs LoRA vs knowledge expansion, on the shared stories and recipes corpora.

Setting S (the research's own): a `tiny` Llama backbone pretrained from scratch on stories with its own BPE tokenizer,
then recipes added by (a) full fine-tuning, (b) LoRA (peft) with about as many trainable parameters as (c), (c) an
expansion domain with an extended tokenizer, (d) an expansion domain without tokenizer extension (the tokenizer
ablation); (e) is a separate `tiny` model trained from scratch on recipes with its own tokenizer ("individual models").

Setting M: SmolLM2-135M as the backbone, recipes added by (a) full fine-tuning, (b) LoRA, (c) expansion, and the
tokenizer ablation (d).

    python benchmarks/compare_methods.py --setting S            # about 6 minutes on 2 idle CPU cores
    python benchmarks/compare_methods.py --setting M            # very short default (20 steps of 4 x 128 tokens)
    python benchmarks/compare_methods.py --setting M --m-steps 500 --m-batch-size 8 --m-block-size 256 \
        --m-eval-texts 0                                        # a full run (GPU or hours of CPU)

Every method sees the same recipes training split, the same block size and the same number of training tokens
(steps x batch x block; an expansion domain's blocks hold its control token, on the steps that keep it, plus text);
seeds are fixed. Each method reports stories and recipes test bits per character before and after (never perplexity:
the tokenizers differ), trainable parameters, training tokens per second (wall time of the whole method: tokenizing,
training and saving), generation tokens per second on one batch mixing both domains (greedy, a fixed number of new
tokens), and two sample generations per domain. LoRA is merged into its model after training, as it would be deployed
to serve both domains with one model. Writes benchmarks/results/compare_methods_{S,M}.{json,md,png}.

Each method's row is saved in WORK_DIR/SETTING/rows.json as soon as it is measured; `--resume` keeps the rows of an
interrupted run with the same settings and measures only the missing methods (the bare backbone is measured again).
"""

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
from transformers.utils import logging as hf_logging

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import language_modeling
from domain_experts.train import TrainingConfig, tokenize_into_blocks, train


logger = logging.getLogger("compare_methods")
DOMAIN = "recipes"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def bits_per_character(model, texts: dict[str, list[str]], args, domain_for_recipes: str | None) -> dict:
    """Test bits per character on stories (bare backbone route) and recipes (the domain's route, if any)."""
    return {
        "stories": language_modeling(model, texts["stories"], None, max_length=args.max_length)["bits_per_character"],
        "recipes": language_modeling(model, texts["recipes"], domain_for_recipes,
                                     max_length=args.max_length)["bits_per_character"],
    }


def prompts(args) -> tuple[list[str], list[str]]:
    """The first words of test texts: half the generation batch stories, half recipes."""
    half = args.gen_batch // 2
    cut = lambda text: " ".join(text.split()[: args.prompt_words])  # noqa: E731
    return ([cut(t) for t in load_texts("stories", "test")[:half]],
            [cut(t) for t in load_texts("recipes", "test")[:half]])


@torch.no_grad()
def generation(model, args, expansion: bool) -> dict:
    """Greedy generation of a fixed number of new tokens on one batch mixing stories and recipes prompts.

    An expansion model routes recipes rows by their control token and stories rows to the bare backbone; any other
    model generates the same prompts as one plain batch. Returns tokens per second (median of `--gen-repeats`) and two
    samples per domain.
    """
    stories, recipes = prompts(args)
    texts = stories + recipes
    model.eval()
    if expansion:
        model.tokenizer.padding_side = "left"
        batch = model.tokenizer(texts, domain=[None] * len(stories) + [DOMAIN] * len(recipes), padding=True,
                                return_tensors="pt")
        decode = lambda ids: model.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        pad = model.tokenizer.pad_token_id
    else:
        model.tokenizer.padding_side = "left"
        batch = model.tokenizer(texts, return_tensors="pt", padding=True)
        decode = lambda ids: model.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        pad = model.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=pad)
    model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    times = []
    for _ in range(args.gen_repeats):
        start = time.perf_counter()
        output = model.generate(**batch, **kwargs)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    new_tokens = output.shape[0] * (output.shape[1] - batch["input_ids"].shape[1])
    decoded = decode(output)
    half = len(stories)
    return {"tokens_per_second": new_tokens / seconds, "batch_size": len(texts), "new_tokens": args.gen_tokens,
            "samples": {"stories": decoded[:2], "recipes": decoded[half : half + 2]}}


@torch.no_grad()
def stories_logits_identical(composed, backbone, args) -> bool:
    """torch.equal of the logits over the backbone vocabulary on a stories batch: composed model vs backbone."""
    texts = load_texts("stories", "test")[: args.gen_batch]
    composed.tokenizer.padding_side = "right"
    batch = composed.tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    composed.eval(), backbone.eval()
    mine = composed(**batch).logits[..., : backbone.config.vocab_size]
    theirs = backbone(**batch).logits
    return bool(torch.equal(mine, theirs))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------


def recipe_blocks(tokenizer, block_size: int) -> datasets.Dataset:
    """Recipes train texts, each ended by EOS, packed into blocks of `block_size` tokens (as the training loop does)."""
    rows = datasets.Dataset.from_dict({"text": load_texts(DOMAIN, "train")})
    return tokenize_into_blocks(rows, tokenizer, SimpleNamespace(text_column="text", packing=True), block_size)


def plain_loop(model, tokenizer, args, steps: int, batch_size: int, block_size: int, learning_rate: float) -> None:
    """AdamW on the model's trainable parameters over packed recipes blocks, cosine schedule, gradient clipping 1."""
    blocks = recipe_blocks(tokenizer, block_size)
    generator = torch.Generator().manual_seed(args.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    model.train()
    step, progress = 0, tqdm(total=steps, desc="Training", leave=False)
    while step < steps:
        order = torch.randperm(len(blocks), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            input_ids = torch.tensor(blocks.select(order[start : start + batch_size])["input_ids"])
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
            step += 1
            progress.update(1), progress.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
    progress.close()
    model.eval()


def full_fine_tuning(backbone_dir: str, load, args, sizes: dict) -> dict:
    """(a) every backbone parameter trained on recipes."""
    set_seed(args.seed)
    model, tokenizer = load(backbone_dir)
    start = time.perf_counter()
    plain_loop(model, tokenizer, args, sizes["steps"], sizes["batch_size"], sizes["block_size"], sizes["lr_full"])
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    model.tokenizer = tokenizer
    return {"model": model, "trainable_parameters": count, "train_seconds": seconds}


def lora(backbone_dir: str, load, args, sizes: dict, target_parameters: int) -> dict:
    """(b) LoRA on every decoder linear layer, its rank chosen to match `target_parameters`; merged after training."""
    from peft import LoraConfig, get_peft_model

    set_seed(args.seed)
    model, tokenizer = load(backbone_dir)
    per_rank = trainable(get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules=LORA_TARGETS)))
    rank = max(1, round(target_parameters / per_rank))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    count = trainable(model)
    logger.info(f"LoRA rank {rank}: {count:,} trainable parameters (target {target_parameters:,}).")
    start = time.perf_counter()
    plain_loop(model, tokenizer, args, sizes["steps"], sizes["batch_size"], sizes["block_size"], sizes["lr_lora"])
    seconds = time.perf_counter() - start
    model = model.merge_and_unload()
    model.tokenizer = tokenizer
    return {"model": model, "trainable_parameters": count, "train_seconds": seconds, "rank": rank}


def expansion(backbone_dir: str, args, sizes: dict, new_tokens: int, output_dir: Path) -> dict:
    """(c)/(d) an expansion domain of `--num-blocks` blocks, with `new_tokens` learned tokens (0: no extension)."""
    start = time.perf_counter()
    model = train(TrainingConfig(
        output_dir=str(output_dir), model=backbone_dir, domain=DOMAIN, add_domain=True, num_blocks=args.num_blocks,
        new_tokens=new_tokens, train_file=str(corpus_path(DOMAIN, "train")),
        validation_file=str(corpus_path(DOMAIN, "validation")), block_size=sizes["block_size"],
        batch_size=sizes["batch_size"], max_steps=sizes["steps"], learning_rate=sizes["lr_expansion"],
        max_eval_samples=20, seed=args.seed, overwrite=True))  # a method not in rows.json is measured afresh
    seconds = time.perf_counter() - start
    count = sum(p.numel() for n, p in model.domains[DOMAIN].named_parameters() if not n.startswith("gate_"))
    model.eval()
    return {"model": model, "trainable_parameters": count, "train_seconds": seconds,
            "new_tokens": len(model.config.domains[DOMAIN]["token_ids"]) - 1}


def pretrain(corpus: str, args, output_dir: Path, steps: int) -> tuple[str, float]:
    """A `tiny` backbone and its own tokenizer trained from scratch on `corpus`; returns its folder and the seconds."""
    start = time.perf_counter()
    train(TrainingConfig(
        output_dir=str(output_dir), preset=args.preset, vocab_size=args.vocab_size,
        train_file=str(corpus_path(corpus, "train")), validation_file=str(corpus_path(corpus, "validation")),
        block_size=args.s_block_size, batch_size=args.s_batch_size, max_steps=steps,
        learning_rate=args.pretrain_lr, warmup_steps=steps // 20, max_eval_samples=20, seed=args.seed, overwrite=True))
    return str(output_dir / "model"), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


def load_folder(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def run_setting(setting: str, args) -> dict:
    work = Path(args.work_dir) / setting
    texts = {name: load_texts(name, "test")[: args.eval_texts or None] for name in ("stories", "recipes")}
    if setting == "S":
        sizes = {"steps": args.s_steps, "batch_size": args.s_batch_size, "block_size": args.s_block_size,
                 "lr_full": args.s_lr_full, "lr_lora": args.s_lr_lora, "lr_expansion": args.s_lr_expansion}
        load, new_tokens = load_folder, args.s_new_tokens
    else:
        texts = {name: t[: args.m_eval_texts or None] for name, t in texts.items()}
        sizes = {"steps": args.m_steps, "batch_size": args.m_batch_size, "block_size": args.m_block_size,
                 "lr_full": args.m_lr_full, "lr_lora": args.m_lr_lora, "lr_expansion": args.m_lr_expansion}
        from domain_experts.smollm2 import load_smollm2

        backbone_dir, pretrain_seconds = "smollm2", None
        load, new_tokens = (lambda _: load_smollm2()), args.m_new_tokens
    training_tokens = sizes["steps"] * sizes["batch_size"] * sizes["block_size"]
    # Everything a row depends on: a resumed run must match it.
    run = {"sizes": sizes, "seed": args.seed, "num_blocks": args.num_blocks, "new_tokens": new_tokens,
           "eval_texts": {name: len(t) for name, t in texts.items()}, "max_length": args.max_length}
    if setting == "S":
        run |= {"preset": args.preset, "vocab_size": args.vocab_size, "pretrain_steps": args.pretrain_steps,
                "pretrain_lr": args.pretrain_lr, "scratch_steps": args.scratch_steps}
    rows_path = work / "rows.json"
    earlier = {}
    if args.resume and rows_path.exists():
        saved = json.loads(rows_path.read_text())
        if saved.get("run") != run:
            raise ValueError(f"{rows_path} holds a run of other settings ({saved.get('run')}, now {run}): resume "
                             "with the same flags, or start afresh in another --work-dir.")
        earlier = {key: row for key, row in saved["rows"].items() if key != "backbone"}
        pretrain_seconds = saved["pretrain_seconds"]
        logger.info(f"Resuming: keeping the rows of {', '.join(earlier) or 'no method'} from {rows_path}.")
    if setting == "S":
        if earlier:
            backbone_dir = str(work / "stories" / "model")  # the backbone the kept rows were measured against
        else:
            logger.info("Pretraining the stories backbone.")
            backbone_dir, pretrain_seconds = pretrain("stories", args, work / "stories", args.pretrain_steps)

    backbone, tokenizer = load(backbone_dir)
    backbone.tokenizer = tokenizer
    num_layers = backbone.config.num_hidden_layers
    logger.info("Measuring the bare backbone.")
    before = bits_per_character(backbone, texts, args, None)
    base_generation = generation(backbone, args, expansion=False)
    rows = {"backbone": {"label": "bare backbone", "before": before, "after": before, "trainable_parameters": 0,
                         "train_tokens_per_second": None, "generation": base_generation}}

    def measured_before(key: str) -> bool:
        if key in earlier:
            rows[key] = earlier[key]
        return key in earlier

    def save_rows() -> None:
        """What is measured so far, should a run stop (see --resume)."""
        rows_path.write_text(json.dumps({"run": run, "pretrain_seconds": pretrain_seconds, "rows": rows}, indent=2))

    def record(key: str, label: str, result: dict, expanded: bool) -> None:
        model = result.pop("model")
        logger.info(f"Measuring {label}.")
        row = {"label": label, "before": before, **result,
               "after": bits_per_character(model, texts, args, DOMAIN if expanded else None),
               "train_tokens_per_second": training_tokens / result["train_seconds"],
               "generation": generation(model, args, expansion=expanded)}
        if expanded:
            row["stories_logits_identical"] = stories_logits_identical(model, backbone, args)
            # The CPU is shared: time the bare backbone again right after, for a paired speed ratio.
            row["backbone_generation_tokens_per_second"] = generation(backbone, args, False)["tokens_per_second"]
        rows[key] = row
        logger.info(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'generation'})}")
        save_rows()

    if not measured_before("expansion"):
        logger.info("(c) expansion with an extended tokenizer.")
        record("expansion", f"(c) expansion, {args.num_blocks} blocks, extended tokenizer",
               expansion(backbone_dir, args, sizes, new_tokens, work / "expansion"), expanded=True)
    if not measured_before("expansion_no_extension"):
        logger.info("(d) expansion without tokenizer extension.")
        record("expansion_no_extension", f"(d) expansion, {args.num_blocks} blocks, no tokenizer extension",
               expansion(backbone_dir, args, sizes, 0, work / "expansion_no_extension"), expanded=True)
    if not measured_before("full_fine_tuning"):
        logger.info("(a) full fine-tuning.")
        record("full_fine_tuning", "(a) full fine-tuning", full_fine_tuning(backbone_dir, load, args, sizes), False)
    if not measured_before("lora"):
        logger.info("(b) LoRA.")
        lora_result = lora(backbone_dir, load, args, sizes, rows["expansion"]["trainable_parameters"])
        record("lora", f"(b) LoRA, rank {lora_result['rank']}, merged", lora_result, False)
    if setting == "S" and not measured_before("scratch"):
        logger.info("(e) a separate model trained from scratch on recipes.")
        steps = args.scratch_steps or args.pretrain_steps
        folder, seconds = pretrain("recipes", args, work / "recipes_scratch", steps)
        model, scratch_tokenizer = load_folder(folder)
        model.tokenizer = scratch_tokenizer
        scratch_tokens = steps * args.s_batch_size * args.s_block_size
        rows["scratch"] = {
            "label": "(e) separate recipes model from scratch", "before": None,
            "after": bits_per_character(model, texts, args, None), "trainable_parameters": trainable(model),
            "train_seconds": seconds, "train_tokens_per_second": scratch_tokens / seconds,
            "training_tokens": scratch_tokens, "generation": generation(model, args, expansion=False)}
        save_rows()

    added = args.num_blocks
    exp, full, lora_row = rows["expansion"], rows["full_fine_tuning"], rows["lora"]
    paired_base = exp["backbone_generation_tokens_per_second"]
    speed_floor = 0.9 * paired_base * num_layers / (num_layers + added)
    targets = {
        "expansion forgets nothing on stories (bit-identical logits)": (
            exp["stories_logits_identical"] and exp["after"]["stories"] == before["stories"],
            f"torch.equal {exp['stories_logits_identical']}; stories bpc {before['stories']:.4f} -> "
            f"{exp['after']['stories']:.4f}"),
        "expansion recipes bpc within 5% of full fine-tuning": (
            exp["after"]["recipes"] <= 1.05 * full["after"]["recipes"],
            f"{exp['after']['recipes']:.4f} vs {full['after']['recipes']:.4f} "
            f"({exp['after']['recipes'] / full['after']['recipes'] - 1:+.1%})"),
        "expansion better than LoRA at equal trainable parameters": (
            exp["after"]["recipes"] < lora_row["after"]["recipes"],
            f"{exp['after']['recipes']:.4f} vs {lora_row['after']['recipes']:.4f}; parameters "
            f"{exp['trainable_parameters']:,} vs {lora_row['trainable_parameters']:,}"),
    }
    ablation = rows["expansion_no_extension"]
    targets["extended tokenizer beats no extension on recipes"] = (
        exp["after"]["recipes"] < ablation["after"]["recipes"],
        f"{exp['after']['recipes']:.4f} vs {ablation['after']['recipes']:.4f}")
    targets["mixed-batch generation >= 0.9 x backbone x L/(L+added)"] = (
        exp["generation"]["tokens_per_second"] >= speed_floor,
        f"{exp['generation']['tokens_per_second']:.1f} vs floor {speed_floor:.1f} tokens/s "
        f"(bare backbone timed right after: {paired_base:.1f}; L={num_layers}, added={added})")
    return {"setting": setting, "backbone": backbone_dir if setting == "M" else f"{args.preset} (stories BPE "
            f"{args.vocab_size})", "backbone_layers": num_layers, "sizes": sizes, "training_tokens": training_tokens,
            "pretrain_seconds": pretrain_seconds, "eval_texts": {k: len(v) for k, v in texts.items()},
            "rows": rows, "targets": {k: {"met": bool(v[0]), "detail": v[1]} for k, v in targets.items()}}


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def markdown(result: dict, command: str) -> str:
    fmt = lambda value: "" if value is None else f"{value:.4f}"  # noqa: E731
    lines = [f"Setting {result['setting']}: backbone {result['backbone']}, {result['training_tokens']:,} recipes "
             f"training tokens per method (train tokens/s: wall time of the whole method, including "
             f"learning the tokenizer where there is one); test bits per character on "
             f"{result['eval_texts']['stories']} stories and {result['eval_texts']['recipes']} recipes texts. "
             f"`{command}`", "",
             "| method | stories bpc before | after | recipes bpc before | after | trainable parameters | "
             "train tokens/s | mixed-batch gen tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"].values():
        before = row["before"] or {"stories": None, "recipes": None}
        speed = row["train_tokens_per_second"]
        lines.append(f"| {row['label']} | {fmt(before['stories'])} | {fmt(row['after']['stories'])} | "
                     f"{fmt(before['recipes'])} | **{fmt(row['after']['recipes'])}** | "
                     f"{row['trainable_parameters']:,} | {'' if speed is None else f'{speed:,.0f}'} | "
                     f"{row['generation']['tokens_per_second']:.1f} |")
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'met' if t['met'] else '**not met**'} | {t['detail']} |"
              for name, t in result["targets"].items()]
    lines += ["", "Sample generations (greedy, mixed batch):", ""]
    for row in result["rows"].values():
        for domain, samples in row["generation"]["samples"].items():
            for sample in samples:
                lines.append(f"- {row['label']}, {domain}: `{' '.join(sample.split())[:300]}`")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["rows"].values())
    labels = [row["label"].split(",")[0] for row in rows]
    x = range(len(rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, domain in zip(axes, ("stories", "recipes")):
        axis.bar([i - 0.2 for i in x], [row["before"][domain] if row["before"] else 0 for row in rows], 0.4,
                 label="before", color="#bbbbbb")
        axis.bar([i + 0.2 for i in x], [row["after"][domain] for row in rows], 0.4, label="after", color="#3366aa")
        axis.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("test bits per character")
        axis.set_title(f"{domain} (lower is better)")
        axis.set_ylim(top=1.2 * axis.get_ylim()[1])  # room for the legend above the bars
    axes[0].legend(loc="upper left", ncol=2)
    figure.suptitle(f"Setting {result['setting']}: adding recipes to {result['backbone']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["S", "M", "both"], default="S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512, help="tokens kept per evaluated text")
    parser.add_argument("--eval-texts", type=int, default=0, help="first N test texts per corpus (0: all)")
    parser.add_argument("--gen-batch", type=int, default=8, help="mixed generation batch: half stories, half recipes")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--prompt-words", type=int, default=6)
    # Setting S
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--scratch-steps", type=int, default=0, help="(e)'s steps (0: --pretrain-steps)")
    parser.add_argument("--s-steps", type=int, default=300)
    parser.add_argument("--s-batch-size", type=int, default=8)
    parser.add_argument("--s-block-size", type=int, default=128)
    parser.add_argument("--s-new-tokens", type=int, default=1000)
    parser.add_argument("--s-lr-full", type=float, default=5e-4)
    parser.add_argument("--s-lr-lora", type=float, default=2e-3)
    parser.add_argument("--s-lr-expansion", type=float, default=2e-3)
    # Setting M
    parser.add_argument("--m-steps", type=int, default=20)
    parser.add_argument("--m-batch-size", type=int, default=4)
    parser.add_argument("--m-block-size", type=int, default=128)
    parser.add_argument("--m-new-tokens", type=int, default=4000)
    parser.add_argument("--m-eval-texts", type=int, default=20, help="first N test texts per corpus (0: all)")
    parser.add_argument("--m-lr-full", type=float, default=5e-5)
    parser.add_argument("--m-lr-lora", type=float, default=5e-4)
    parser.add_argument("--m-lr-expansion", type=float, default=2e-4)
    parser.add_argument("--work-dir", default="runs/compare_methods", help="trained models go here")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--resume", action="store_true", help="keep the methods WORK_DIR/SETTING/rows.json holds")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    for setting in (["S", "M"] if args.setting == "both" else [args.setting]):
        command = "python benchmarks/compare_methods.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v != parser.get_default(k) and k not in ("setting", "resume")) + f" --setting {setting}"
        result = run_setting(setting, args)
        result["args"], result["command"] = vars(args), command.replace("  ", " ")
        out = Path(args.results_dir) / f"compare_methods_{setting}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown(result, result["command"]))
        plot(result, out.with_suffix(".png"))
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
