"""Issues 7 and 14: full fine-tuning vs LoRA vs domains (expansion blocks, routed adapters, both), on the shared stories
and recipes corpora. Recipes are added to a backbone that knows stories; stories must not be forgotten.

Setting S (the research's own): a `tiny` Llama backbone pretrained from scratch on stories with its own BPE tokenizer,
then recipes added by (a) full fine-tuning, (b) LoRA (peft) with about as many trainable parameters as (c), (c) an
expansion domain with an extended tokenizer, (d) an expansion domain without tokenizer extension (the tokenizer
ablation); (e) is a separate `tiny` model trained from scratch on recipes with its own tokenizer ("individual models").
Learning rates are fixed (--s-lr-*).

Setting M: SmolLM2-135M as the backbone, recipes added by (a) full fine-tuning, (b) LoRA on every projection, its rank
chosen so that its trainable parameters match (c)'s, merged after training, (c) a domain of --num-blocks expansion
blocks, (d) a domain of routed adapters only, of LoRA's rank and alpha (LoRA's parameter count: the comparison at equal
parameters), (e) a domain of blocks and routed adapters of LoRA's rank ((c) and (d) together). The method table also
holds (f), a domain of blocks with tokens of its own, left out of the default run (`--m-methods ... domain_tokens`).
Every learning rate is chosen on the recipes validation split, by the same procedure for every method.

    python benchmarks/compare_methods.py --setting S      # about 6 minutes on 2 idle CPU cores
    python benchmarks/compare_methods.py --setting M      # hours on 2 CPU cores (with --resume after an interruption)

How the methods are trained and measured:

- Every method takes the same steps on the same recipes training blocks in the same order (the library's
  `MixedBatchSampler`, same seed): rows of --*-block-size tokens, a domain's control token or, for a plain model, the
  tokenizer's BOS (EOS if it has none) first, then block_size - 1 tokens of packed text; a method with tokens of its
  own packs the text with its own tokenizer. AdamW without weight decay, cosine schedule without warmup, gradient norm
  clipped to 1.
- Domains train through the library's own loop, `train(TrainingConfig(...))`, with `control_token_dropout=0.0`: the
  comparison measures a domain through its control token. Full fine-tuning and LoRA train in `train_plain`, the same
  steps in a plain loop (`train` trains domains, or backbones from scratch).
- Setting M's learning rates: each rate of a method's grid (--m-lr) trains for --m-search-steps steps (the same
  schedule, shorter) and is scored by recipes validation bits per character; while the best rate is at an edge of what
  was tried, the next rate of the 1-3-10 lattice beyond it is tried too (at most --lr-extend more); the best rate then
  trains for the full budget. The best domain configuration is the domain method with the lowest validation bits per
  character after its full-budget run. The test split decides nothing.
- Test bits per character (never perplexity: the tokenizers differ) are measured text by text on the first
  --eval-texts / --m-eval-texts test texts (0: all), with standard errors over texts (the delta method for a ratio of
  sums), and paired differences between methods on the same texts, with their standard errors.
- Training tokens per second come from a dedicated phase that times a few training steps of every method side by
  side (--speed-rounds interleaved rounds of --speed-steps steps, median), not from the wall time of the long runs:
  the CPU is shared.
- A domain must leave the bare backbone's rows alone: `torch.equal` of its stories logits against the backbone's, and
  the stories bits of every test text identical to the backbone's.
- Also: generation tokens per second on one batch mixing both domains (greedy, a fixed number of new tokens), and two
  sample generations per domain. LoRA is merged into its model, as it would be deployed to serve both domains.

Writes benchmarks/results/compare_methods_{S,M}.{json,md,png}.

Everything measured is saved in WORK_DIR/SETTING/rows.json as soon as it is measured (each learning rate tried, each
method's row, the speed phase); `--resume` keeps what it holds of a run with the same settings and measures only what
is missing (the bare backbone is measured again). Methods may be added to a resumed run (the speed phase is then timed
again for all of them, side by side) or left out (the others keep their timings).
"""

import argparse
import copy
import gc
import json
import logging
import math
import statistics
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
from transformers.utils import logging as hf_logging

from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import language_modeling
from domain_experts.files import remove_folder, write_file_atomically
from domain_experts.train import Collator, MixedBatchSampler, TrainingConfig, model_to_train, tokenize_into_blocks, train


logger = logging.getLogger("compare_methods")
DOMAIN = "recipes"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Learning rates of the search: 1, 3, 10, 30, ... x 1e-7.
RATE_LATTICE = tuple(float(f"{mantissa}e{exponent}") for exponent in range(-7, 0) for mantissa in (1, 3))


# ----------------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of adding recipes to the backbone.

    A plain method trains the backbone in `train_plain`: every parameter, or (`lora`) a peft LoRA of LoRA's rank on
    every projection, merged after training. A domain method (`blocks` and/or `adapters`) adds a recipes domain and
    trains it with the library's `train`.
    """

    label: str  # "{rank}" (LoRA's) and "{blocks}" are filled in
    lora: bool = False
    blocks: bool = False  # --num-blocks expansion blocks
    adapters: bool = False  # routed adapters of LoRA's rank, alpha twice the rank (as LoRA's)
    own_tokens: bool = False  # tokens of its own, learned from the recipes training text (setting M: the number
    # chosen on validation among --m-new-tokens, started by `domain_experts.token_init`)
    grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # setting M: the learning rates tried first (--m-lr)
    rate_from: str | None = None  # setting M: take this method's chosen rate instead of searching one

    @property
    def is_domain(self) -> bool:
        return self.blocks or self.adapters


METHODS = {
    "full_fine_tuning": Method("(a) full fine-tuning", grid=(3e-5, 1e-4, 3e-4)),
    "lora": Method("(b) LoRA, rank {rank}, merged", lora=True),
    # Setting S's expansion domains.
    "expansion": Method("(c) expansion, {blocks} blocks, extended tokenizer", blocks=True, own_tokens=True),
    "expansion_no_extension": Method("(d) expansion, {blocks} blocks, no tokenizer extension", blocks=True),
    # Setting M's domains.
    "domain_blocks": Method("(c) domain, {blocks} blocks", blocks=True),
    "domain_adapters": Method("(d) domain, routed adapters of rank {rank} (LoRA's parameters)", adapters=True),
    "domain_blocks_adapters": Method("(e) domain, {blocks} blocks + routed adapters of rank {rank}", blocks=True,
                                     adapters=True),
    # Its tokens are chosen and started on the validation split at every run, which costs minutes: it trains once,
    # at the rate chosen for (c), the same domain without tokens of its own.
    "domain_tokens": Method("(f) domain, {blocks} blocks, tokens of its own", blocks=True, own_tokens=True,
                            rate_from="domain_blocks"),
}


@dataclass(frozen=True)
class Setting:
    methods: tuple[str, ...]  # the default methods, in the order they run
    lora_reference: str  # LoRA's rank makes its trainable parameters match this method's


SETTINGS = {
    "S": Setting(("expansion", "expansion_no_extension", "full_fine_tuning", "lora"), "expansion"),
    "M": Setting(("full_fine_tuning", "lora", "domain_blocks", "domain_adapters", "domain_blocks_adapters",
                  "domain_tokens"), "domain_blocks"),
}
M_METHODS = ("full_fine_tuning", "lora", "domain_blocks", "domain_adapters", "domain_blocks_adapters", "domain_tokens")


@dataclass
class Run:
    """One setting's run: the backbone, the budget, the methods and their learning rates, the texts."""

    setting: str
    args: argparse.Namespace
    work: Path
    backbone_dir: str
    steps: int
    batch_size: int
    block_size: int
    new_tokens: int | list[int]
    search_steps: int
    methods: list[str]
    grids: dict[str, tuple[float, ...]]
    texts: dict[str, list[str]]  # test texts, by corpus
    validation: list[str]  # recipes validation texts
    lora_rank: int = 0

    @property
    def training_tokens(self) -> int:
        return self.steps * self.batch_size * self.block_size

    def load(self):
        """A fresh copy of the backbone and its tokenizer."""
        if self.backbone_dir == "smollm2":
            from domain_experts.smollm2 import load_smollm2

            return load_smollm2()
        return AutoModelForCausalLM.from_pretrained(self.backbone_dir), AutoTokenizer.from_pretrained(self.backbone_dir)

    def label(self, key: str) -> str:
        return METHODS[key].label.format(rank=self.lora_rank, blocks=self.args.num_blocks)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)


def lora_rank_matching(model, target_parameters: int) -> int:
    """The LoRA rank whose trainable parameters come closest to `target_parameters` (they grow linearly with it)."""
    from peft import get_peft_model

    per_rank = trainable(get_peft_model(copy.deepcopy(model), lora_config(1)))
    return max(1, round(target_parameters / per_rank))


def domain_config(run: Run, key: str, learning_rate: float, steps: int, output_dir: Path,
                  for_timing: bool = False) -> TrainingConfig:
    """The `train` settings of a domain method. Setting S starts its tokens as release 0.1 did (the mean of their
    pieces), setting M as the library does now (`--token-init fit`: chosen and started on the validation split); a
    model built `for_timing` only has the largest number of tokens, started as the mean of their pieces."""
    method = METHODS[key]
    new_tokens = run.new_tokens if method.own_tokens else 0
    fit = run.setting == "M" and not for_timing
    if for_timing and isinstance(new_tokens, list):
        new_tokens = max(new_tokens)
    return TrainingConfig(
        output_dir=str(output_dir), model=run.backbone_dir, domain=DOMAIN, add_domain=True,
        num_blocks=run.args.num_blocks if method.blocks else 0, adapter_rank=run.lora_rank if method.adapters else 0,
        new_tokens=new_tokens, token_init="fit" if fit else "mean", train_file=str(corpus_path(DOMAIN, "train")),
        validation_file=str(corpus_path(DOMAIN, "validation")), block_size=run.block_size, batch_size=run.batch_size,
        max_steps=steps, learning_rate=learning_rate, control_token_dropout=0.0,
        # A domain choosing its tokens does so on the validation split: all of it.
        max_eval_samples=None if method.own_tokens and run.setting == "M" else 20,
        seed=run.args.seed, overwrite=True)  # a run not recorded in rows.json is trained afresh


def domain_parameters(model) -> list[torch.nn.Parameter]:
    """What `train` trains in a domain: its parameters but the gate's."""
    return [p for name, p in model.domains[DOMAIN].named_parameters() if not name.startswith("gate_")]


def untrained_model(run: Run, key: str):
    """The model a method starts training from, its trainable parameters set (LoRA not merged)."""
    set_seed(run.args.seed)
    if METHODS[key].is_domain:
        config = domain_config(run, key, 0.0, 1, run.work / key, for_timing=True)
        model, _ = model_to_train(config, {DOMAIN: load_texts(DOMAIN, "train")})
        model.requires_grad_(False)
        for parameter in domain_parameters(model):
            parameter.requires_grad_(True)
        return model
    model, tokenizer = run.load()
    if METHODS[key].lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(run.lora_rank))
    else:
        model.requires_grad_(True)
    model.tokenizer = tokenizer
    return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def recipe_blocks(tokenizer, length: int, num_texts: int | None = None) -> datasets.Dataset:
    """Recipes train texts, each ended by EOS, packed into rows of `length` token ids, as `train` packs them."""
    rows = datasets.Dataset.from_dict({"text": load_texts(DOMAIN, "train")[:num_texts]})
    return tokenize_into_blocks(rows, tokenizer, SimpleNamespace(text_column="text", packing=True), length)


def plain_batch(blocks: datasets.Dataset, indices: list[int], first_token: int) -> dict:
    """Rows of a plain model: `first_token` (never a target) then a block of text; no padding (blocks are full)."""
    input_ids = torch.tensor([[first_token, *ids] for ids in blocks.select(indices)["input_ids"]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def domain_batch(model, blocks: datasets.Dataset, indices: list[int]) -> dict:
    """Rows of a domain, as `train` collates them: its control token, a block of text, `domain_ids`."""
    control_token_ids = [model.control_token_id(name) for name in model.domain_names]
    domain = model.domain_names.index(DOMAIN)
    rows = [{"input_ids": ids, "domain": domain} for ids in blocks.select(indices)["input_ids"]]
    return Collator(model.tokenizer.pad_token_id or 0, control_token_ids, 0.0, seed=0)(rows, step=0)


def first_token_of(tokenizer) -> int:
    """What a plain model's rows start with, in training and in `language_modeling`: BOS, or EOS without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def training_step(model, batch: dict, parameters: list, optimizer) -> torch.Tensor:
    """Forward, mean token loss, backward, gradient norm clipped to 1, AdamW step."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def train_plain(model, run: Run, learning_rate: float, steps: int) -> None:
    """`train`'s steps on a plain model: the same blocks in the same order (`MixedBatchSampler`), AdamW without weight
    decay, cosine schedule without warmup, gradient norm clipped to 1; each row starts with BOS instead of a control
    token."""
    tokenizer = model.tokenizer
    blocks = recipe_blocks(tokenizer, run.block_size - 1)
    sampler = MixedBatchSampler([(DOMAIN, 0, len(blocks))], run.batch_size, steps, run.args.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    model.train()
    progress = tqdm(sampler, desc=f"Training (plain loop, lr {learning_rate:g})", unit="step", leave=False)
    for indices in progress:
        loss = training_step(model, plain_batch(blocks, indices, first_token_of(tokenizer)), parameters, optimizer)
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def trained_model(run: Run, key: str, learning_rate: float, steps: int, output_dir: Path) -> tuple[object, int]:
    """A method trained for `steps` steps at `learning_rate`, ready to measure (LoRA merged), and how many parameters
    it trained."""
    if METHODS[key].is_domain:
        model = train(domain_config(run, key, learning_rate, steps, output_dir))
        return model.eval(), sum(p.numel() for p in domain_parameters(model))
    model = untrained_model(run, key)
    count = trainable(model)
    train_plain(model, run, learning_rate, steps)
    if METHODS[key].lora:
        tokenizer = model.tokenizer
        model = model.merge_and_unload()
        model.tokenizer = tokenizer
    return model.eval(), count


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
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def measured_characters(tokenizer, text: str, max_length: int) -> int:
    """The characters `language_modeling` counts for `text`: those of the tokens it keeps (`max_length` - 1)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return len(tokenizer.decode(ids[: max_length - 1]))


def text_bits(model, texts: list[str], domain: str | None, max_length: int, what: str) -> dict:
    """Per text, the bits `language_modeling` measures (its summed negative log-likelihood, in bits) and its characters.

    Returns:
        `{"bits": list[float], "characters": list[int]}`, one entry per text.
    """
    tokenizer = model.tokenizer.tokenizer_for(domain) if hasattr(model, "domain_names") else model.tokenizer
    bits, characters = [], []
    for text in tqdm(texts, desc=f"{what}: bits per character, text by text", unit="text", leave=False):
        count = measured_characters(tokenizer, text, max_length)
        bpc = language_modeling(model, [text], domain, max_length=max_length, description=what)["bits_per_character"]
        bits.append(bpc * count)
        characters.append(count)
    return {"bits": bits, "characters": characters}


def influence(measured: dict) -> tuple[float, list[float]]:
    """Bits per character of all texts (total bits / total characters) and each text's linearised contribution to its
    deviation (the delta method: texts are the sampled units)."""
    total_characters = sum(measured["characters"])
    bpc = sum(measured["bits"]) / total_characters
    return bpc, [(b - bpc * c) / total_characters for b, c in zip(measured["bits"], measured["characters"])]


def standard_error(contributions: list[float]) -> float | None:
    n = len(contributions)
    return math.sqrt(n / (n - 1) * sum(u * u for u in contributions)) if n > 1 else None


def bpc_with_error(measured: dict) -> tuple[float, float | None]:
    """Bits per character and its standard error over texts."""
    bpc, contributions = influence(measured)
    return bpc, standard_error(contributions)


def paired_difference(first: dict, second: dict) -> tuple[float, float | None]:
    """bpc(first) - bpc(second), measured on the same texts, and the standard error of that difference."""
    bpc_first, u_first = influence(first)
    bpc_second, u_second = influence(second)
    return bpc_first - bpc_second, standard_error([a - b for a, b in zip(u_first, u_second)])


def test_bits(model, run: Run, domain: str | None) -> dict:
    """Stories texts on the bare backbone route, recipes texts on `domain`'s route (None: the model itself)."""
    return {"stories": text_bits(model, run.texts["stories"], None, run.args.max_length, "stories test"),
            "recipes": text_bits(model, run.texts["recipes"], domain, run.args.max_length, "recipes test")}


def validation_bpc(model, run: Run, domain: str | None) -> float:
    return bpc_with_error(text_bits(model, run.validation, domain, run.args.max_length, "recipes validation"))[0]


def summary(per_text: dict) -> tuple[dict, dict]:
    """Bits per character and standard errors of each corpus."""
    pairs = {corpus: bpc_with_error(measured) for corpus, measured in per_text.items()}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def prompts(args) -> tuple[list[str], list[str]]:
    """The first words of test texts: half the generation batch stories, half recipes."""
    half = args.gen_batch // 2
    cut = lambda text: " ".join(text.split()[: args.prompt_words])  # noqa: E731
    return ([cut(t) for t in load_texts("stories", "test")[:half]],
            [cut(t) for t in load_texts("recipes", "test")[:half]])


@torch.no_grad()
def generation(model, args) -> dict:
    """Greedy generation of a fixed number of new tokens on one batch mixing stories and recipes prompts.

    A domain model routes recipes rows by their control token and stories rows to the bare backbone; any other model
    generates the same prompts as one plain batch. Returns tokens per second (median of `--gen-repeats`) and two
    samples per domain.
    """
    stories, recipes = prompts(args)
    model.eval()
    model.tokenizer.padding_side = "left"
    routes = {"domain": [None] * len(stories) + [DOMAIN] * len(recipes)} if hasattr(model, "domain_names") else {}
    batch = model.tokenizer(stories + recipes, padding=True, return_tensors="pt", **routes)
    pad = model.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=pad)
    model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    times = []
    for _ in range(args.gen_repeats):
        start = time.perf_counter()
        output = model.generate(**batch, **kwargs)
        times.append(time.perf_counter() - start)
    new_tokens = output.shape[0] * (output.shape[1] - batch["input_ids"].shape[1])
    decoded = model.tokenizer.batch_decode(output, skip_special_tokens=True)
    half = len(stories)
    return {"tokens_per_second": new_tokens / statistics.median(times), "batch_size": len(decoded),
            "new_tokens": args.gen_tokens,
            "samples": {"stories": decoded[: min(2, half)], "recipes": decoded[half : half + 2]}}


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


def training_speed(run: Run, keys: list[str]) -> dict[str, list[float]]:
    """Seconds of each training step of every method, timed side by side: `--speed-rounds` rounds, each running
    `--speed-steps` steps of every method (after one untimed step), the order of the methods turning each round.

    Each method's step is the one it trains with (forward, mean token loss, backward, clipping, AdamW) on the first
    batch of its training order.
    """
    built = {}
    for key in keys:
        logger.info(f"Speed phase: building {run.label(key)}.")
        model = untrained_model(run, key)
        if METHODS[key].is_domain:
            tokenizer = model.tokenizer.tokenizer_for(DOMAIN)
            blocks = recipe_blocks(tokenizer, run.block_size - 1, num_texts=64)
            batch = domain_batch(model, blocks, list(range(run.batch_size)))
        else:
            blocks = recipe_blocks(model.tokenizer, run.block_size - 1, num_texts=64)
            batch = plain_batch(blocks, list(range(run.batch_size)), first_token_of(model.tokenizer))
        parameters = [p for p in model.parameters() if p.requires_grad]
        model.train()
        built[key] = (model, batch, parameters, torch.optim.AdamW(parameters, lr=1e-6, weight_decay=0.0))
    seconds = {key: [] for key in keys}
    progress = tqdm(total=run.args.speed_rounds * len(keys), desc="Speed phase: timing training steps", unit="method")
    for round_index in range(run.args.speed_rounds):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            model, batch, parameters, optimizer = built[key]
            training_step(model, batch, parameters, optimizer)  # untimed: the previous method's caches are cold
            for _ in range(run.args.speed_steps):
                start = time.perf_counter()
                training_step(model, batch, parameters, optimizer)
                seconds[key].append(time.perf_counter() - start)
            progress.update(1)
    progress.close()
    return seconds


# ----------------------------------------------------------------------------------------------------------------
# Learning rates
# ----------------------------------------------------------------------------------------------------------------


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def next_rate(rate: float, upward: bool) -> float | None:
    """The next rate of `RATE_LATTICE` above (or below) `rate`."""
    beyond = [r for r in RATE_LATTICE if (r > rate * 1.0001 if upward else r < rate / 1.0001)]
    return (min if upward else max)(beyond) if beyond else None


def search_learning_rate(run: Run, key: str, tried: dict[str, float], save) -> float:
    """The rate of `key`'s grid (extended beyond an edge while the best is there) with the lowest recipes validation
    bits per character after `run.search_steps` steps. `tried` (rate -> validation bpc) holds the rates measured
    before; each new one is added and saved at once."""
    rates = sorted(run.grids[key])
    if len(rates) == 1:
        return rates[0]

    def score(rate: float) -> float:
        if rate_key(rate) not in tried:
            logger.info(f"{run.label(key)}: learning rate {rate:g}, {run.search_steps} steps.")
            folder = run.work / "search" / key / f"lr-{rate_key(rate)}"
            model, _ = trained_model(run, key, rate, run.search_steps, folder)
            tried[rate_key(rate)] = validation_bpc(model, run, DOMAIN if METHODS[key].is_domain else None)
            logger.info(f"{run.label(key)}: learning rate {rate:g}: validation bpc {tried[rate_key(rate)]:.4f}.")
            del model
            gc.collect()
            remove_folder(folder / "model", "config.json")  # a domain's saved model is no longer needed
            save()
        return tried[rate_key(rate)]

    for rate in rates:
        score(rate)
    for _ in range(run.args.lr_extend):
        best = min(rates, key=score)
        if best not in (rates[0], rates[-1]):
            break
        beyond = next_rate(best, upward=best == rates[-1])
        if beyond is None:
            break
        rates = sorted(rates + [beyond])
        score(beyond)
    return min(rates, key=score)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def parse_rate_grids(specs: list[str] | None) -> dict[str, tuple[float, ...]]:
    """`--m-lr KEY=RATE[,RATE...]` flags -> {method key: rates}."""
    grids = {}
    for spec in specs or []:
        key, _, rates = spec.partition("=")
        if key not in METHODS or not rates:
            raise SystemExit(f"--m-lr {spec!r}: write METHOD=RATE[,RATE...], METHOD one of {', '.join(M_METHODS)}.")
        try:
            grids[key] = tuple(sorted(float(rate) for rate in rates.split(",")))
        except ValueError:
            raise SystemExit(f"--m-lr {spec!r}: the rates must be numbers, e.g. lora=3e-4,1e-3,3e-3.") from None
    return grids


def make_run(setting: str, args) -> Run:
    work = Path(args.work_dir) / setting
    texts = {name: load_texts(name, "test") for name in ("stories", "recipes")}
    validation = load_texts(DOMAIN, "validation")[: args.validation_texts or None]
    if setting == "S":
        rates = {"full_fine_tuning": args.s_lr_full, "lora": args.s_lr_lora, "expansion": args.s_lr_expansion,
                 "expansion_no_extension": args.s_lr_expansion}
        return Run(setting, args, work, str(work / "stories" / "model"), args.s_steps, args.s_batch_size,
                   args.s_block_size, args.s_new_tokens, 0, list(SETTINGS["S"].methods),
                   {key: (rate,) for key, rate in rates.items()},
                   {name: t[: args.eval_texts or None] for name, t in texts.items()}, validation)
    grids = {key: METHODS[key].grid for key in M_METHODS} | parse_rate_grids(args.m_lr)
    return Run(setting, args, work, args.m_backbone, args.m_steps, args.m_batch_size, args.m_block_size,
               args.m_new_tokens, args.m_search_steps, list(args.m_methods), grids,
               {name: t[: args.m_eval_texts or None] for name, t in texts.items()}, validation)


def run_setting(setting: str, args) -> dict:
    run = make_run(setting, args)
    # Everything a saved measurement depends on: a resumed run must match it (methods may be added).
    signature = {"backbone": run.backbone_dir, "steps": run.steps, "batch_size": run.batch_size,
                 "block_size": run.block_size, "search_steps": run.search_steps, "seed": args.seed,
                 "num_blocks": args.num_blocks, "new_tokens": run.new_tokens,
                 "eval_texts": {name: len(t) for name, t in run.texts.items()}, "validation_texts": len(run.validation),
                 "max_length": args.max_length, "lr_extend": args.lr_extend,
                 "speed": [args.speed_rounds, args.speed_steps]}
    if setting == "S":
        signature |= {"preset": args.preset, "vocab_size": args.vocab_size, "pretrain_steps": args.pretrain_steps,
                      "pretrain_lr": args.pretrain_lr, "scratch_steps": args.scratch_steps}
    state_path = run.work / "rows.json"
    fresh = {"run": signature, "pretrain_seconds": None, "lora": None, "speed": None, "search": {}, "rows": {}}
    state = fresh
    if args.resume and state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved.get("run") != signature:
            raise ValueError(f"{state_path} holds a run of other settings ({saved.get('run')}, now {signature}): "
                             "resume with the same flags, or start afresh in another --work-dir.")
        state = saved
        state["rows"].pop("backbone", None)
        logger.info(f"Resuming: keeping the rows of {', '.join(state['rows']) or 'no method'} from {state_path}.")

    def save() -> None:
        """What is measured so far, should a run stop (see --resume)."""
        run.work.mkdir(parents=True, exist_ok=True)
        write_file_atomically(state_path, json.dumps(state, indent=2))

    if setting == "S" and (state is fresh or not Path(run.backbone_dir).is_dir()):
        logger.info("Pretraining the stories backbone.")
        state = fresh  # whatever was measured was measured against another backbone
        run.backbone_dir, state["pretrain_seconds"] = pretrain("stories", args, run.work / "stories",
                                                               args.pretrain_steps)

    backbone, tokenizer = run.load()
    backbone.tokenizer = tokenizer
    num_layers = backbone.config.num_hidden_layers
    logger.info("Measuring the bare backbone.")
    backbone_bits = test_bits(backbone, run, None)
    before, before_error = summary(backbone_bits)
    rows = {"backbone": {"label": "bare backbone", "after": before, "standard_error": before_error,
                         "validation": validation_bpc(backbone, run, None), "trainable_parameters": 0,
                         "per_text": backbone_bits,
                         "generation": generation(backbone, args)}}
    rows |= state["rows"]
    state["rows"] = rows

    if state["lora"] is None:
        reference = untrained_model(run, SETTINGS[setting].lora_reference)
        count = trainable(reference)
        del reference
        plain, _ = run.load()
        state["lora"] = {"rank": lora_rank_matching(plain, count), "reference_parameters": count}
        del plain
        save()
    run.lora_rank = state["lora"]["rank"]
    logger.info(f"LoRA rank {run.lora_rank}: about the {state['lora']['reference_parameters']:,} trainable parameters "
                f"of {run.label(SETTINGS[setting].lora_reference)}.")

    speed_keys = run.methods
    if state["speed"] is None or not set(speed_keys) <= set(state["speed"]):
        logger.info("Speed phase: training steps of every method, side by side.")
        state["speed"] = training_speed(run, speed_keys)
        gc.collect()
        save()
    step_tokens = run.batch_size * run.block_size

    for key in run.methods:
        if METHODS[key].rate_from in rows:
            run.grids[key] = (rows[METHODS[key].rate_from]["learning_rate"],)
        grid = list(run.grids[key])
        if key in rows and rows[key].get("grid") == grid:
            continue
        method = METHODS[key]
        label = run.label(key)
        tried = state["search"].setdefault(key, {})
        learning_rate = search_learning_rate(run, key, tried, save)
        logger.info(f"{label}: learning rate {learning_rate:g}, {run.steps} steps.")
        start = time.perf_counter()
        model, count = trained_model(run, key, learning_rate, run.steps, run.work / key)
        seconds = time.perf_counter() - start
        logger.info(f"Measuring {label}.")
        route = DOMAIN if method.is_domain else None
        per_text = test_bits(model, run, route)
        after, error = summary(per_text)
        row = {"label": label, "learning_rate": learning_rate, "grid": grid,
               "search": {rate: tried[rate] for rate in sorted(tried, key=float)} if len(grid) > 1 else None,
               "validation": validation_bpc(model, run, route),
               "trainable_parameters": count, "after": after, "standard_error": error, "per_text": per_text, "train_seconds": seconds,
               "generation": generation(model, args)}
        if method.is_domain:
            row["new_tokens"] = len(model.config.domains[DOMAIN]["token_ids"]) - 1
            row["token_init"] = model.config.domains[DOMAIN].get("token_init")
            if method.rate_from:
                row["rate_from"] = method.rate_from
            row["stories_logits_identical"] = stories_logits_identical(model, backbone, args)
            # The CPU is shared: time the bare backbone again right after, for a paired speed ratio.
            row["backbone_generation_tokens_per_second"] = generation(backbone, args)["tokens_per_second"]
        rows[key] = row
        logger.info(f"{label}: " + json.dumps({k: v for k, v in row.items() if k not in ("generation", "per_text")}))
        save()
        del model
        gc.collect()

    if setting == "S" and "scratch" not in rows:
        logger.info("(e) a separate model trained from scratch on recipes.")
        steps = args.scratch_steps or args.pretrain_steps
        folder, seconds = pretrain("recipes", args, run.work / "recipes_scratch", steps)
        model, scratch_tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        model.tokenizer = scratch_tokenizer
        per_text = test_bits(model, run, None)
        after, error = summary(per_text)
        rows["scratch"] = {
            "label": "(e) separate recipes model from scratch", "after": after, "standard_error": error,
            "per_text": per_text, "trainable_parameters": trainable(model), "train_seconds": seconds,
            "training_tokens": steps * args.s_batch_size * args.s_block_size, "generation": generation(model, args)}
        save()

    # The rows of this run's methods, in its order (a resumed run may have dropped some).
    rows = {key: rows[key] for key in ["backbone", *run.methods, "scratch"] if key in rows}
    for key, row in rows.items():
        times = state["speed"].get(key)
        row["train_tokens_per_second"] = step_tokens / statistics.median(times) if times else None
        row["train_step_seconds"] = times
    comparisons = paired_comparisons(rows, run.methods)
    targets = (setting_s_targets(rows, before, num_layers, args.num_blocks) if setting == "S"
               else setting_m_targets(rows, before, comparisons, run))
    return {"setting": setting, "backbone": run.backbone_dir if setting == "M" else f"{args.preset} (stories BPE "
            f"{args.vocab_size})", "backbone_layers": num_layers, "steps": run.steps, "batch_size": run.batch_size,
            "block_size": run.block_size, "search_steps": run.search_steps, "training_tokens": run.training_tokens,
            "lora_rank": run.lora_rank, "pretrain_seconds": state["pretrain_seconds"],
            "eval_texts": {k: len(v) for k, v in run.texts.items()}, "validation_texts": len(run.validation),
            "speed": {"rounds": args.speed_rounds, "steps": args.speed_steps, "tokens_per_step": step_tokens},
            "rows": rows, "comparisons": comparisons,
            "targets": {k: {"met": bool(v[0]), "detail": v[1]} for k, v in targets.items()}}


def paired_comparisons(rows: dict, methods: list[str]) -> dict:
    """Recipes test bpc of every other method minus LoRA's and minus full fine-tuning's, on the same texts, with SEs."""
    comparisons = {}
    for reference in ("lora", "full_fine_tuning"):
        if reference not in rows:
            continue
        base = rows[reference]
        for key in methods:
            if key == reference or key not in rows:
                continue
            difference, error = paired_difference(rows[key]["per_text"]["recipes"], base["per_text"]["recipes"])
            comparisons[f"{key} - {reference}"] = {
                "difference": difference, "standard_error": error,
                "relative": difference / base["after"]["recipes"],
                "relative_standard_error": None if error is None else error / base["after"]["recipes"]}
    return comparisons


def stories_untouched(row: dict, backbone_bits: dict) -> bool:
    """A domain's stories logits equal the backbone's, and so do the bits of every stories test text."""
    return row["stories_logits_identical"] and row["per_text"]["stories"] == backbone_bits


def plus_minus(value: float, error: float | None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" + ("" if error is None else f" ± {error:.{digits}f}")


def setting_s_targets(rows: dict, before: dict, num_layers: int, added: int) -> dict:
    exp, full, lora, ablation = (rows[k] for k in ("expansion", "full_fine_tuning", "lora", "expansion_no_extension"))
    paired_base = exp["backbone_generation_tokens_per_second"]
    speed_floor = 0.9 * paired_base * num_layers / (num_layers + added)
    return {
        "expansion forgets nothing on stories (bit-identical logits)": (
            stories_untouched(exp, rows["backbone"]["per_text"]["stories"]),
            f"torch.equal {exp['stories_logits_identical']}; stories bpc {before['stories']:.4f} -> "
            f"{exp['after']['stories']:.4f}"),
        "expansion recipes bpc within 5% of full fine-tuning": (
            exp["after"]["recipes"] <= 1.05 * full["after"]["recipes"],
            f"{exp['after']['recipes']:.4f} vs {full['after']['recipes']:.4f} "
            f"({exp['after']['recipes'] / full['after']['recipes'] - 1:+.1%})"),
        "expansion better than LoRA at equal trainable parameters": (
            exp["after"]["recipes"] < lora["after"]["recipes"],
            f"{exp['after']['recipes']:.4f} vs {lora['after']['recipes']:.4f}; parameters "
            f"{exp['trainable_parameters']:,} vs {lora['trainable_parameters']:,}"),
        "extended tokenizer beats no extension on recipes": (
            exp["after"]["recipes"] < ablation["after"]["recipes"],
            f"{exp['after']['recipes']:.4f} vs {ablation['after']['recipes']:.4f}"),
        "mixed-batch generation >= 0.9 x backbone x L/(L+added)": (
            exp["generation"]["tokens_per_second"] >= speed_floor,
            f"{exp['generation']['tokens_per_second']:.1f} vs floor {speed_floor:.1f} tokens/s "
            f"(bare backbone timed right after: {paired_base:.1f}; L={num_layers}, added={added})"),
    }


def setting_m_targets(rows: dict, before: dict, comparisons: dict, run: Run) -> dict:
    domains = [key for key in run.methods if METHODS[key].is_domain]
    if not domains:
        return {}
    best = min(domains, key=lambda key: rows[key]["validation"])
    letter = lambda key: rows[key]["label"].split(" ")[0]  # noqa: E731
    by_validation = ", ".join(f"{letter(key)} {rows[key]['validation']:.4f}" for key in domains)
    chosen = f"best domain configuration by validation bpc: {rows[best]['label']} ({by_validation})"
    targets = {}
    for reference, name, allowed in (("lora", "recipes test bpc <= LoRA's", 0.0),
                                     ("full_fine_tuning", "within 1% of full fine-tuning", 0.01)):
        if reference not in rows:
            continue
        mine, theirs = rows[best]["after"]["recipes"], rows[reference]["after"]["recipes"]
        paired = comparisons[f"{best} - {reference}"]
        error = paired["relative_standard_error"]
        targets[f"best domain configuration: {name}"] = (
            mine <= (1 + allowed) * theirs,
            f"{plus_minus(mine, rows[best]['standard_error']['recipes'])} vs "
            f"{plus_minus(theirs, rows[reference]['standard_error']['recipes'])}; paired difference "
            f"{paired['difference']:+.4f} ({paired['relative']:+.2%}"
            + ("" if error is None else f" ± {error:.2%} SE") + f"); {chosen}")
    if "domain_tokens" in rows and "domain_blocks" in rows:
        difference, error = paired_difference(rows["domain_tokens"]["per_text"]["recipes"],
                                              rows["domain_blocks"]["per_text"]["recipes"])
        targets["domain with tokens of its own at least as good as without, after the same training"] = (
            difference <= 0, f"{rows['domain_tokens']['after']['recipes']:.4f} vs "
            f"{rows['domain_blocks']['after']['recipes']:.4f}; paired difference {plus_minus(difference, error)} "
            f"({rows['domain_tokens']['new_tokens']:,} tokens kept)")
    untouched = {key: stories_untouched(rows[key], rows["backbone"]["per_text"]["stories"]) for key in domains}
    targets["every domain configuration forgets nothing on stories (bit-identical)"] = (
        all(untouched.values()),
        "; ".join(f"{letter(key)} torch.equal {rows[key]['stories_logits_identical']}, stories "
                  f"bpc {before['stories']:.4f} -> {rows[key]['after']['stories']:.4f}, every text's bits equal: "
                  f"{rows[key]['per_text']['stories'] == rows['backbone']['per_text']['stories']}" for key in domains))
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def markdown(result: dict, command: str) -> str:
    before = result["rows"]["backbone"]["after"]
    m = result["setting"] == "M"
    lines = [f"Setting {result['setting']}: backbone {result['backbone']}, {result['steps']} steps of "
             f"{result['batch_size']} x {result['block_size']} tokens ({result['training_tokens']:,} recipes training "
             f"tokens) per method; test bits per character (± standard error over texts) on "
             f"{result['eval_texts']['stories']} stories and {result['eval_texts']['recipes']} recipes texts; before "
             f"training: stories {before['stories']:.4f}, recipes {before['recipes']:.4f}. Train tokens/s: "
             f"{result['speed']['rounds']} interleaved rounds of {result['speed']['steps']} timed steps per method, "
             "median. " + ("Learning rates chosen on the recipes validation split "
                           f"({result['validation_texts']} texts, {result['search_steps']}-step runs). " if m else "")
             + f"`{command}`", "",
             "| method | trainable parameters | learning rate | recipes validation bpc | recipes test bpc | stories "
             "test bpc | train tokens/s | mixed-batch gen tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"].values():
        speed = row.get("train_tokens_per_second")
        error = row["standard_error"]
        validation, rate = row.get("validation"), row.get("learning_rate")
        lines.append(f"| {row['label']} | {row['trainable_parameters']:,} | {'' if rate is None else f'{rate:g}'} | "
                     f"{'' if validation is None else f'{validation:.4f}'} | "
                     f"**{plus_minus(row['after']['recipes'], error['recipes'])}** | "
                     f"{plus_minus(row['after']['stories'], error['stories'])} | "
                     f"{'' if speed is None else f'{speed:,.0f}'} | {row['generation']['tokens_per_second']:.1f} |")
    if result["comparisons"]:
        lines += ["", "Paired differences of recipes test bpc (same texts; ± standard error):", "",
                  "| method | minus | difference | relative |", "|---|---|---|---|"]
        for name, paired in result["comparisons"].items():
            key, reference = name.split(" - ")
            relative_error = paired["relative_standard_error"]
            lines.append(f"| {result['rows'][key]['label']} | {result['rows'][reference]['label']} | "
                         f"{plus_minus(paired['difference'], paired['standard_error'])} | {paired['relative']:+.2%}"
                         + ("" if relative_error is None else f" ± {relative_error:.2%}") + " |")
    chosen = {row["label"]: row["token_init"] for row in result["rows"].values()
              if (row.get("token_init") or {}).get("validation_bits_per_character")}
    if chosen:
        lines += ["", "Tokens of its own, chosen on the recipes validation split before training (validation bpc of "
                  "the domain without them and with each number tried; `domain_experts.token_init`):", ""]
        for label, record in chosen.items():
            tried = ", ".join(f"{key}: {bpc:.4f}" for key, bpc in record["validation_bits_per_character"].items())
            lines.append(f"- {label}: {record['new_tokens']:,} tokens kept ({tried})")
    searched = {row["label"]: row for row in result["rows"].values() if row.get("search")}
    if searched:
        lines += ["", "Learning-rate search (recipes validation bpc after the short runs; chosen in bold):", "",
                  "| method | learning rate -> validation bpc |", "|---|---|"]
        for label, row in searched.items():
            cells = [(f"**{rate} -> {bpc:.4f}**" if float(rate) == row["learning_rate"] else f"{rate} -> {bpc:.4f}")
                     for rate, bpc in row["search"].items()]
            lines.append(f"| {label} | {'; '.join(cells)} |")
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
    searched = [row for row in rows if row.get("search")]
    labels = [textwrap.fill(row["label"], 24) for row in rows]
    x = list(range(len(rows)))
    figure, axes = plt.subplots(1, 3 if searched else 2, figsize=(17 if searched else 11, 5.5))
    for axis, corpus in zip(axes, ("recipes", "stories")):
        values = [row["after"][corpus] for row in rows]
        errors = [row["standard_error"][corpus] or 0.0 for row in rows]
        axis.bar(x, values, 0.6, yerr=errors, capsize=3, color="#3366aa")
        axis.axhline(result["rows"]["backbone"]["after"][corpus], color="#999999", linestyle="--", linewidth=1,
                     label="bare backbone")
        axis.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("test bits per character (± SE over texts)")
        axis.set_title(f"{corpus} after training (lower is better)")
        low = min(v - e for v, e in zip(values, errors))
        high = max(v + e for v, e in zip(values, errors))
        axis.set_ylim(low - 0.15 * (high - low) - 1e-3, high + 0.15 * (high - low) + 1e-3)
        axis.legend(loc="upper right", fontsize=8)
    if searched:
        axis = axes[2]
        for row in searched:
            rates = [float(rate) for rate in row["search"]]
            line, = axis.plot(rates, list(row["search"].values()), marker="o", label=textwrap.shorten(row["label"], 40))
            axis.plot([row["learning_rate"]], [row["search"][rate_key(row["learning_rate"])]], marker="*",
                      markersize=14, color=line.get_color())
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_ylabel("recipes validation bpc")
        axis.set_title(f"learning-rate search ({result['search_steps']} steps; star: chosen)")
        axis.legend(fontsize=8)
    figure.suptitle(f"Setting {result['setting']}: adding recipes to {result['backbone']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["S", "M", "both"], default="S", help="which comparison to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every initialisation and data order")
    parser.add_argument("--num-blocks", type=int, default=4, help="expansion blocks of a domain with blocks")
    parser.add_argument("--max-length", type=int, default=512, help="tokens kept per evaluated text")
    parser.add_argument("--eval-texts", type=int, default=0, help="setting S: first N test texts per corpus (0: all)")
    parser.add_argument("--validation-texts", type=int, default=0,
                        help="first N recipes validation texts that score learning rates (0: all)")
    parser.add_argument("--gen-batch", type=int, default=8, help="mixed generation batch: half stories, half recipes")
    parser.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generated row")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generations (median)")
    parser.add_argument("--prompt-words", type=int, default=6, help="words of a test text that prompt a generation")
    parser.add_argument("--speed-rounds", type=int, default=5, help="speed phase: interleaved rounds over the methods")
    parser.add_argument("--speed-steps", type=int, default=2, help="speed phase: timed steps per method and round")
    parser.add_argument("--lr-extend", type=int, default=2,
                        help="setting M: rates tried at most beyond an edge of a grid where the best rate lies")
    # Setting S
    parser.add_argument("--preset", default="tiny", help="setting S: the size of the backbone pretrained on stories")
    parser.add_argument("--vocab-size", type=int, default=4096, help="setting S: the backbone's BPE vocabulary")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="setting S: pretraining steps on stories")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3, help="setting S: pretraining learning rate")
    parser.add_argument("--scratch-steps", type=int, default=0, help="setting S: (e)'s steps (0: --pretrain-steps)")
    parser.add_argument("--s-steps", type=int, default=300, help="setting S: recipes training steps per method")
    parser.add_argument("--s-batch-size", type=int, default=8, help="setting S: rows per step")
    parser.add_argument("--s-block-size", type=int, default=128, help="setting S: tokens per row")
    parser.add_argument("--s-new-tokens", type=int, default=1000, help="setting S: (c)'s tokens of its own")
    parser.add_argument("--s-lr-full", type=float, default=5e-4, help="setting S: (a)'s learning rate")
    parser.add_argument("--s-lr-lora", type=float, default=2e-3, help="setting S: (b)'s learning rate")
    parser.add_argument("--s-lr-expansion", type=float, default=2e-3, help="setting S: (c) and (d)'s learning rate")
    # Setting M
    parser.add_argument("--m-backbone", default="smollm2",
                        help="setting M: the backbone, 'smollm2' or a causal LM folder (the tests use a tiny one)")
    parser.add_argument("--m-methods", nargs="+", choices=M_METHODS, default=list(SETTINGS["M"].methods),
                        help="setting M: the methods to run, in order")
    parser.add_argument("--m-lr", action="append", metavar="METHOD=RATE[,RATE...]",
                        help="setting M: the learning rates a method's search starts from; repeatable (defaults: "
                             + "; ".join(f"{key} {','.join(f'{r:g}' for r in METHODS[key].grid)}" for key in M_METHODS)
                             + ")")
    parser.add_argument("--m-steps", type=int, default=200, help="setting M: recipes training steps per method")
    parser.add_argument("--m-search-steps", type=int, default=50,
                        help="setting M: steps of each learning rate's validation run")
    parser.add_argument("--m-batch-size", type=int, default=4, help="setting M: rows per step")
    parser.add_argument("--m-block-size", type=int, default=128, help="setting M: tokens per row")
    parser.add_argument("--m-new-tokens", type=int, nargs="+", default=[1000, 2000],
                        help="setting M: the numbers of tokens of its own (f) chooses between on validation")
    parser.add_argument("--m-eval-texts", type=int, default=0, help="setting M: first N test texts per corpus (0: all)")
    parser.add_argument("--work-dir", default="runs/compare_methods", help="trained models and rows.json go here")
    parser.add_argument("--results-dir", default="benchmarks/results", help="where the json, md and png go")
    parser.add_argument("--resume", action="store_true", help="keep what WORK_DIR/SETTING/rows.json holds")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    for setting in (["S", "M"] if args.setting == "both" else [args.setting]):
        flags = []
        for name, value in vars(args).items():
            if value == parser.get_default(name) or name in ("setting", "resume"):
                continue
            flag = "--" + name.replace("_", "-")
            if name == "m_lr":
                flags += [f"{flag} {spec}" for spec in value]
            else:
                flags.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
        command = " ".join(["python benchmarks/compare_methods.py", *flags, f"--setting {setting}"])
        result = run_setting(setting, args)
        result["args"], result["command"] = vars(args), command
        out = Path(args.results_dir) / f"compare_methods_{setting}"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(out.with_suffix(".json"), json.dumps(result, indent=2))
        write_file_atomically(out.with_suffix(".md"), markdown(result, command))
        plot(result, out.with_suffix(".png"))
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
