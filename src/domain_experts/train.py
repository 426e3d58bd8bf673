"""One readable Accelerate training loop: train one domain of a DomainExperts model, or pretrain a small backbone.

Runs unchanged under `python` and under `accelerate launch` (several processes, GPUs or, on a machine without them,
gloo processes on the CPU):

    domain-experts train --model smollm2 --domain recipes --add-domain --train-file recipes.train.jsonl \
        --validation-file recipes.validation.jsonl --output-dir runs/recipes --max-steps 200
    accelerate launch --multi_gpu --num_processes 2 -m domain_experts.cli train ...   # same flags
    domain-experts train --preset tiny --vocab-size 4096 --train-file stories.train.jsonl --output-dir runs/stories

`batch_size` is the global batch of one optimizer step before gradient accumulation; Accelerate splits it across
processes, so a run gives the same result whatever the number of processes (up to floating-point reduction order).
Checkpoints (`accelerator.save_state`) are written to a temporary folder and renamed into place, so a kill during a
save leaves the previous checkpoint usable; `--resume` continues from the newest one and ends with the same weights as
an uninterrupted run.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, get_scheduler
from transformers.utils import logging

from .modeling_domain_experts import DomainExpertsForCausalLM


logger = logging.get_logger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
RUN_CONFIG_FILE = "run_config.json"
FINAL_MODEL_FOLDER = "model"
# Settings that do not change what a run computes, so a resumed run may change them.
_RESUMABLE_CHANGES = {"resume", "report_to", "checkpoint_steps", "keep_checkpoints", "eval_steps", "max_eval_samples"}


@dataclass
class TrainingConfig:
    """Everything a training run needs; each field is also a `domain-experts train` flag."""

    output_dir: str = field(metadata={"help": "Where checkpoints, the run config and the final model go."})
    model: str | None = field(default=None, metadata={
        "help": "A saved DomainExperts model, a backbone id or path (wrapped on the fly), or 'smollm2'."})
    domain: str | None = field(default=None, metadata={"help": "The domain to train (its parameters only)."})
    add_domain: bool = field(default=False, metadata={"help": "Add --domain to the model before training it."})
    num_blocks: int = field(default=4, metadata={"help": "Expansion blocks of an added domain."})
    new_tokens: int = field(default=0, metadata={"help": "Tokens an added domain learns from the training text."})
    preset: str | None = field(default=None, metadata={
        "help": "Pretrain a Llama backbone of this preset (tiny, small, base) from scratch instead of a domain."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the tokenizer trained for --preset."})
    dataset: str | None = field(default=None, metadata={"help": "A dataset on the Hub (instead of --train-file)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "json, jsonl, csv, parquet or txt file."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out file of the same kind."})
    validation_split_percentage: int = field(default=5, metadata={
        "help": "Without a validation file or split, hold out this share of the training rows."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    packing: bool = field(default=True, metadata={
        "help": "Pack texts end to end into blocks (else truncate each text to a block)."})
    batch_size: int = field(default=8, metadata={"help": "Global sequences per step, split across processes."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to run."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 to disable)."})
    control_token_dropout: float = field(default=0.5, metadata={
        "help": "Share of steps whose sequences carry no control token (routed explicitly), so the domain also "
                "serves rows the learned gate routes to it."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end only)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the validation rows."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the training rows."})
    checkpoint_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: never)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in --output-dir."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and dropout."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (passed to Accelerate)."})
    report_to: str | None = field(default=None, metadata={"help": "An Accelerate tracker (tensorboard, wandb, ...)."})

    def run_signature(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE_CHANGES}


# ----------------------------------------------------------------------------------------------------------------
# Checks done before any work
# ----------------------------------------------------------------------------------------------------------------


def _validate(config: TrainingConfig) -> None:
    if (config.preset is None) == (config.domain is None):
        raise ValueError("Pass either --domain (train a domain) or --preset (pretrain a backbone from scratch).")
    if config.preset is None and config.model is None:
        raise ValueError("Training a domain needs --model (a DomainExperts model, a backbone, or 'smollm2').")
    if config.dataset is None and config.train_file is None:
        raise ValueError("Pass --train-file or --dataset.")
    for path in (config.train_file, config.validation_file):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"No such data file: {path}")
    if config.block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {config.block_size}.")
    if config.max_steps < 1 or config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ValueError("max_steps, batch_size and gradient_accumulation_steps must be positive.")
    if not 0.0 <= config.control_token_dropout <= 1.0:
        raise ValueError(f"control_token_dropout must be in [0, 1], got {config.control_token_dropout}.")
    output_dir = Path(config.output_dir)
    run_config = output_dir / RUN_CONFIG_FILE
    if config.resume:
        if not run_config.is_file():
            raise FileNotFoundError(f"Nothing to resume: {output_dir} holds no {RUN_CONFIG_FILE}.")
        saved = json.loads(run_config.read_text())
        changed = {k: (saved.get(k), v) for k, v in config.run_signature().items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"{output_dir} holds a checkpoint of another run; these settings differ: {details}.")
        if latest_checkpoint(output_dir) is None:
            raise FileNotFoundError(f"Nothing to resume: no complete checkpoint in {output_dir / CHECKPOINTS_FOLDER}.")
    elif run_config.exists() and latest_checkpoint(output_dir) is not None:
        raise FileExistsError(f"{output_dir} already holds a run: pass --resume to continue it, or pick another "
                              "--output-dir (nothing is overwritten).")


def load_text_datasets(config: TrainingConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and validation rows, each with the text column, checked non-empty."""
    if config.dataset is not None:
        loaded = datasets.load_dataset(config.dataset, config.dataset_config)
    else:
        files = {"train": config.train_file}
        if config.validation_file:
            files["validation"] = config.validation_file
        extension = Path(config.train_file).suffix.lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(extension)
        if builder is None:
            raise ValueError(f"Cannot read {config.train_file}: use a json, jsonl, csv, parquet or txt file.")
        loaded = datasets.load_dataset(builder, data_files=files)
    if "train" not in loaded:
        raise ValueError(f"The dataset has no 'train' split (it has {list(loaded)}).")
    train = loaded["train"]
    for split_name, split in loaded.items():
        if config.text_column not in split.column_names:
            raise ValueError(f"The {split_name} split has no column {config.text_column!r}; its columns are "
                             f"{split.column_names}. Pass --text-column.")
    train = train.filter(lambda row: bool(row[config.text_column] and row[config.text_column].strip()))
    if len(train) == 0:
        raise ValueError("The training data is empty: no row has text in column " + repr(config.text_column) + ".")
    if "validation" in loaded:
        validation = loaded["validation"]
    else:
        held_out = max(1, len(train) * config.validation_split_percentage // 100)
        split = train.train_test_split(test_size=held_out, seed=config.seed)
        train, validation = split["train"], split["test"]
    if config.max_train_samples:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples:
        validation = validation.select(range(min(config.max_eval_samples, len(validation))))
    return train, validation


def load_model(config: TrainingConfig, train_texts: list[str]):
    """The model to train and its tokenizer: a from-scratch backbone, or a DomainExperts model with the domain."""
    if config.preset is not None:
        from .scratch import create_backbone, train_tokenizer

        tokenizer = train_tokenizer(train_texts, vocab_size=config.vocab_size)
        model = create_backbone(config.preset, tokenizer, seed=config.seed,
                                max_position_embeddings=max(1024, config.block_size))
        return model, tokenizer
    if config.model == "smollm2":
        from .smollm2 import load_smollm2

        backbone, tokenizer = load_smollm2()
        model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    elif (Path(config.model) / "config.json").is_file() and "domain_experts" in (Path(config.model) / "config.json").read_text():
        model = DomainExpertsForCausalLM.from_pretrained(config.model)
    else:
        backbone = AutoModelForCausalLM.from_pretrained(config.model)
        model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=AutoTokenizer.from_pretrained(config.model))
    if model.tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; training needs one.")
    if config.add_domain:
        set_seed(config.seed)
        model.add_domain(config.domain, num_blocks=config.num_blocks,
                         corpus=train_texts if config.new_tokens else None,
                         num_new_tokens=config.new_tokens or None)
    elif config.domain not in model.domains:
        known = ", ".join(model.domain_names) or "none"
        raise ValueError(f"Unknown domain {config.domain!r} in {config.model} (it has: {known}); "
                         "pass --add-domain to create it.")
    return model, model.tokenizer_for(config.domain)


def _context_length(model) -> int | None:
    config = model.config.backbone_config if isinstance(model, DomainExpertsForCausalLM) else model.config
    text_config = config.get_text_config(decoder=True)
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def tokenize_into_blocks(rows: datasets.Dataset, tokenizer, config: TrainingConfig, length: int) -> datasets.Dataset:
    """Rows of `length` token ids: texts (each ended by EOS) packed end to end, or each truncated to `length`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[config.text_column], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    tokenized = rows.map(tokenize, batched=True, remove_columns=rows.column_names, desc="Tokenizing")
    if not config.packing:
        return tokenized.map(lambda row: {"input_ids": row["input_ids"][:length]}, desc="Truncating")

    def pack(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        return {"input_ids": [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]}

    return tokenized.map(pack, batched=True, batch_size=1000, desc="Packing")


class Collator:
    """Pads rows on the right and, for a domain, puts its control token first on the steps that keep it.

    Whether a step keeps the control token depends only on (seed, step), so a resumed run sees the same batches.
    Steps without it pass `domain_ids` instead: the domain also learns to serve rows the gate routes to it.
    """

    def __init__(self, pad_token_id: int, control_token_id: int | None, domain_index: int | None,
                 control_token_dropout: float, seed: int):
        self.pad_token_id = pad_token_id
        self.control_token_id = control_token_id
        self.domain_index = domain_index
        self.control_token_dropout = control_token_dropout
        self.seed = seed

    def __call__(self, rows: list[dict], step: int) -> dict:
        keep_control = random.Random(f"{self.seed}/{step}").random() >= self.control_token_dropout
        sequences = [([self.control_token_id] if self.control_token_id is not None and keep_control else [])
                     + row["input_ids"] for row in rows]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": input_ids.masked_fill(attention_mask == 0, -100)}
        if self.domain_index is not None and not keep_control:
            batch["domain_ids"] = torch.full((len(sequences),), self.domain_index, dtype=torch.long)
        return batch


class _StepCollator:
    """Hands the collator the optimizer step a batch belongs to (batches are consumed in order)."""

    def __init__(self, collator: Collator, gradient_accumulation_steps: int):
        self.collator = collator
        self.batches_per_step = gradient_accumulation_steps
        self.calls = 0

    def __call__(self, rows):
        batch = self.collator(rows, self.calls // self.batches_per_step)
        self.calls += 1
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (partial ones, from a kill during a save, are never complete)."""
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    complete = sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []
    return complete[-1] if complete else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed into place once every process has written."""
    folder = output_dir / CHECKPOINTS_FOLDER
    final = folder / f"checkpoint-{step:08d}"
    partial = folder / f".partial-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps({"completed_steps": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in sorted(folder.glob("checkpoint-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator: Accelerator) -> dict:
    """Validation loss and perplexity per target token, over all processes."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in dataloader:
        targets = (batch["labels"][:, 1:] != -100).sum()
        loss = model(**batch).loss
        loss_sum, count = accelerator.gather_for_metrics((loss.detach() * targets, targets))
        total_loss += float(loss_sum.sum())
        total_tokens += int(count.sum())
    model.train()
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50))}


def train(config: TrainingConfig):
    """Run training as `config` says; return the trained model (unwrapped) after saving it to `output_dir/model`."""
    _validate(config)
    output_dir = Path(config.output_dir)
    train_rows, validation_rows = load_text_datasets(config)
    model, tokenizer = load_model(config, train_rows[config.text_column])
    context = _context_length(model)
    if context is not None and config.block_size > context:
        raise ValueError(f"block_size={config.block_size} is larger than the backbone's context of {context} tokens.")

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_dir=str(output_dir),
        # The batch is global and split across processes: results do not depend on the number of processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        # Several processes and no GPU: gloo processes on the CPU.
        cpu=world_size > 1 and not torch.cuda.is_available(),
    )
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {accelerator.num_processes} processes.")
    set_seed(config.seed)

    is_domain = config.domain is not None
    length = config.block_size - 1 if is_domain else config.block_size  # room for the control token
    with accelerator.main_process_first():
        train_blocks = tokenize_into_blocks(train_rows, tokenizer, config, length)
        validation_blocks = tokenize_into_blocks(validation_rows, tokenizer, config, length)
    if len(train_blocks) == 0:
        raise ValueError(f"The training text is shorter than one block of {config.block_size} tokens; lower "
                         "--block-size or pass --packing false.")
    if len(validation_blocks) == 0:
        validation_blocks = tokenize_into_blocks(validation_rows, tokenizer, dataclasses.replace(config, packing=False),
                                                 length)

    if is_domain:
        model.requires_grad_(False)
        trainable = [p for n, p in model.domains[config.domain].named_parameters() if not n.startswith("gate_")]
        for parameter in trainable:
            parameter.requires_grad_(True)
        collator = Collator(tokenizer.pad_token_id or 0, model.control_token_id(config.domain),
                            model.domain_names.index(config.domain), config.control_token_dropout, config.seed)
    else:
        trainable = list(model.parameters())
        collator = Collator(tokenizer.pad_token_id or 0, None, None, 0.0, config.seed)
    logger.info(f"Training {sum(p.numel() for p in trainable):,} parameters "
                f"({'domain ' + repr(config.domain) if is_domain else 'the whole backbone'}).")

    if len(train_blocks) < config.batch_size:
        raise ValueError(f"The training data makes {len(train_blocks)} blocks, fewer than one batch of "
                         f"{config.batch_size}; lower --batch-size or --block-size.")
    train_loader = torch.utils.data.DataLoader(
        train_blocks, batch_size=config.batch_size, shuffle=True, drop_last=True,
        collate_fn=_StepCollator(collator, config.gradient_accumulation_steps))
    eval_loader = torch.utils.data.DataLoader(
        validation_blocks, batch_size=config.batch_size, collate_fn=lambda rows: collator(rows, step=0))
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    completed_steps = 0
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(config.run_signature(), indent=2))
    if config.resume:
        checkpoint = latest_checkpoint(output_dir)
        accelerator.load_state(str(checkpoint))
        completed_steps = json.loads((checkpoint / "trainer_state.json").read_text())["completed_steps"]
        logger.info(f"Resuming from {checkpoint} at step {completed_steps}.")
    if config.report_to:
        accelerator.init_trackers("domain_experts", config=dataclasses.asdict(config))
        if not accelerator.trackers:
            raise ValueError(f"Tracker {config.report_to!r} is not installed.")

    # Accelerate ends an epoch with an optimizer step even when its last accumulation is short.
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    progress = tqdm(total=config.max_steps, initial=completed_steps, desc="Training",
                    disable=not accelerator.is_local_main_process)
    model.train()
    epoch = completed_steps // steps_per_epoch
    while completed_steps < config.max_steps:
        # The seedable sampler draws each epoch's order from (seed, epoch): a resumed run replays it and skips ahead.
        train_loader.set_epoch(epoch)
        loader = train_loader
        batches_done = (completed_steps - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        train_loader.collate_fn.calls = completed_steps * config.gradient_accumulation_steps
        if batches_done:
            loader = accelerator.skip_first_batches(train_loader, batches_done)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            logs = {"loss": loss.item(), "perplexity": math.exp(min(loss.item(), 50)), "lr": scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{logs['loss']:.3f}")
            accelerator.log(logs, step=completed_steps)
            if config.eval_steps and completed_steps % config.eval_steps == 0 and completed_steps < config.max_steps:
                metrics = evaluate_loss(model, eval_loader, accelerator)
                accelerator.log(metrics, step=completed_steps)
                logger.info(f"step {completed_steps}: {metrics}")
            if config.checkpoint_steps and completed_steps % config.checkpoint_steps == 0:
                save_checkpoint(accelerator, output_dir, completed_steps, config.keep_checkpoints)
            if completed_steps >= config.max_steps:
                break
        epoch += 1
    progress.close()

    metrics = evaluate_loss(model, eval_loader, accelerator)
    accelerator.log(metrics, step=completed_steps)
    if accelerator.is_main_process:
        logger.warning(f"Finished {completed_steps} steps: validation loss {metrics['eval_loss']:.4f}, "
                       f"perplexity {metrics['eval_perplexity']:.2f}.")
    model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        partial = output_dir / f".partial-{FINAL_MODEL_FOLDER}"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        if not is_domain:
            tokenizer.save_pretrained(partial)
        (partial / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(output_dir / FINAL_MODEL_FOLDER, ignore_errors=True)
        os.replace(partial, output_dir / FINAL_MODEL_FOLDER)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model


def add_train_command(commands) -> None:
    """Register `domain-experts train`; its flags are the fields of `TrainingConfig`."""
    parser = commands.add_parser("train", help="train a domain, or pretrain a small backbone (Accelerate)",
                                 add_help=False)
    # Every flag, --help included, is left to the HfArgumentParser of `TrainingConfig`.
    parser.set_defaults(run=lambda args: train(parse_training_config(args.extra_arguments)), takes_extra_arguments=True)


def parse_training_config(arguments: list[str]) -> TrainingConfig:
    parser = HfArgumentParser(TrainingConfig, prog="domain-experts train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    (config,) = parser.parse_args_into_dataclasses(arguments)
    return config
