"""One readable Accelerate training loop: train domains of a DomainExperts model, or pretrain a small backbone.

Runs unchanged under `python` and under `accelerate launch` (several processes: GPUs or, on a machine without them,
gloo processes on the CPU; FSDP and DeepSpeed on GPUs, see examples/):

    domain-experts train --model smollm2 --domain recipes --add-domain --train-file recipes.train.jsonl \\
        --validation-file recipes.validation.jsonl --output-dir runs/recipes --max-steps 200
    domain-experts train --model smollm2 --add-domain --domain recipes=recipes.jsonl --domain legal=legal.jsonl ...
    accelerate launch --config_file examples/accelerate_config.yaml -m domain_experts.cli train ...   # same flags
    domain-experts train --preset tiny --vocab-size 4096 --train-file stories.train.jsonl --output-dir runs/stories

`batch_size` is the global batch of one optimizer step before gradient accumulation; Accelerate splits it across
processes, so a run gives the same result whatever the number of processes (up to floating-point reduction order).

Several domains train in one run as if each were trained alone on its own rows: every batch holds `batch_size /
domains` rows of each (interleaved, so that every process gets rows of each), drawn from that domain's own seeded
order; the loss is the sum over domains of each domain's mean token loss over the whole batch (`domain_balanced_loss`),
so a domain's parameters get the gradient of its own rows' mean loss; and gradients are clipped domain by domain
(each domain's token rows apart from its blocks and adapters: `_clip_groups`).
A domain trained alone with `batch_size / domains` rows per step takes the same steps (tested).

The run folder (`--output-dir`):

- `run_config.json`: the settings that define the run and fingerprints of what it starts from (the training and
  validation texts, the starting model's tensors, the tokenizer). `--resume` refuses a run whose settings, data or
  starting model changed, naming what changed; a folder that already holds a run is never trained over without
  `--resume` or `--overwrite`.
- `checkpoints/checkpoint-NNNNNNNN/`: `accelerator.save_state` (optimizer, scheduler, RNG and sampler states), with
  only the trainable tensors (`trainable.safetensors`: a frozen backbone is loaded from its source on resume and never
  from a checkpoint), `trainer_state.json`, and `checkpoint_manifest.json` (the size and sha256 of every file). A
  checkpoint is written to a staging folder and renamed into place, so a kill during a save leaves the previous one;
  on resume every file is checked against the manifest, and a damaged checkpoint is moved aside (named
  `damaged-checkpoint-NNNNNNNN`, nothing is deleted) for the newest intact one, saying so.
- `model/`: the trained model (`save_pretrained`), written whole or not at all at the end.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
from contextlib import ExitStack
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    broadcast_object_list,
    set_seed,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler
from transformers.utils import logging

from .configuration_domain_experts import AdapterConfig, check_domain_name
from .modeling_domain_experts import BASE_ROUTE, DomainExpansion
from .files import (
    TEXT_FILE_BUILDERS,
    DataFileError,
    check_location,
    check_replaceable,
    folder_manifest,
    read_json_file,
    read_text_file,
    remove_folder,
    verify_folder_manifest,
    working_in_folder,
    write_file_atomically,
    write_folder_atomically,
    writing_folder,
)
from .training_config import TrainingConfig, parse_training_config


logger = logging.get_logger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
RUN_CONFIG_FILE = "run_config.json"
FINAL_MODEL_FOLDER = "model"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_MANIFEST_FILE = "checkpoint_manifest.json"
TRAINABLE_WEIGHTS_FILE = "trainable.safetensors"
DAMAGED_PREFIX = "damaged-"
# A checkpoint folder is ours (may be replaced or rotated away) when it holds one of these.
_CHECKPOINT_MARKERS = (CHECKPOINT_MANIFEST_FILE, TRAINER_STATE_FILE)
_RUN_CONFIG_FORMAT = 2

__all__ = ["TrainingConfig", "find_resumable_checkpoint", "latest_checkpoint", "parse_training_config",
           "save_checkpoint", "train"]


# ----------------------------------------------------------------------------------------------------------------
# Checks done before any work
# ----------------------------------------------------------------------------------------------------------------


def _validate(config: TrainingConfig) -> None:
    if (config.preset is None) == (not config.domain):
        raise ValueError("Pass either --domain (train a domain) or --preset (pretrain a backbone from scratch).")
    if config.preset is None and config.model is None:
        raise ValueError("Training a domain needs --model (a DomainExperts model, a backbone, or 'smollm2').")
    sources = config.domain_sources()
    for name in sources:
        check_domain_name(name)
    own_files = [name for name, (train_file, _) in sources.items() if train_file]
    shared_data = config.train_file or config.validation_file or config.dataset
    if own_files and (len(own_files) != len(sources) or shared_data):
        raise ValueError("Give every --domain its own files (NAME=TRAIN_FILE[,VALIDATION_FILE]) and no --train-file, "
                         "--validation-file or --dataset; or train one domain on --train-file or --dataset.")
    if len(sources) > 1 and not own_files:
        raise ValueError("Several domains each need their own files: --domain NAME=TRAIN_FILE[,VALIDATION_FILE].")
    if not own_files and config.dataset is None and config.train_file is None:
        raise ValueError("Pass --train-file or --dataset.")
    if sources and config.batch_size % len(sources):
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {len(sources)} domains: every "
                         "batch holds as many rows of each.")
    if (config.adapter_rank or config.adapter_targets or config.adapter_alpha) and not config.add_domain:
        raise ValueError("--adapter-rank, --adapter-alpha and --adapter-targets configure domains added with "
                         "--add-domain.")
    if (config.adapter_targets or config.adapter_alpha) and not config.adapter_rank:
        raise ValueError("--adapter-alpha and --adapter-targets need --adapter-rank.")
    if config.new_tokens and not config.add_domain:
        raise ValueError("--new-tokens gives tokens of its own to a domain added with --add-domain.")
    if config.num_blocks is not None and not config.add_domain:
        raise ValueError("--num-blocks configures a domain added with --add-domain.")
    if config.control_embedding is not None and not config.add_domain:
        raise ValueError("--control-embedding configures a domain added with --add-domain; a domain the model has "
                         "keeps what its control token reads as.")
    if config.adapter_rank < 0 or (config.num_blocks is not None and config.num_blocks < 0):
        raise ValueError("--adapter-rank and --num-blocks must be 0 or more.")
    if config.new_tokens and min(config.new_tokens) < 1:
        raise ValueError(f"--new-tokens must be positive numbers, got {config.new_tokens}.")
    if config.token_learning_rate is not None and not config.token_learning_rate > 0:
        raise ValueError(f"--token-learning-rate must be positive, got {config.token_learning_rate}.")
    if config.token_learning_rate is not None and config.preset:
        raise ValueError("--token-learning-rate sets the rate of a domain's token rows; a backbone pretrained with "
                         "--preset trains at --learning-rate.")
    if not config.token_tolerance >= 0:
        raise ValueError(f"--token-tolerance must be 0 or more, got {config.token_tolerance}.")
    if config.token_init_distill_steps < 0:
        raise ValueError(f"--token-init-distill-steps must be 0 or more, got {config.token_init_distill_steps}.")
    if config.token_init_distill_length < 2:
        raise ValueError(f"--token-init-distill-length must be at least 2, got {config.token_init_distill_length}.")
    if config.model not in (None, "smollm2"):
        check_location(config.model)
    for path in (config.train_file, config.validation_file, *(f for pair in sources.values() for f in pair)):
        if path is not None and not Path(path).is_file():
            if Path(path).is_dir():
                raise ValueError(f"{path} is a folder: give a data file ({', '.join(TEXT_FILE_BUILDERS)}).")
            raise FileNotFoundError(f"No such data file: {path}")
    if config.block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {config.block_size}.")
    if config.max_steps < 1 or config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ValueError("max_steps, batch_size and gradient_accumulation_steps must be positive.")
    if not config.learning_rate > 0:
        raise ValueError(f"--learning-rate must be positive, got {config.learning_rate}.")
    if config.weight_decay < 0 or config.warmup_steps < 0 or config.max_grad_norm < 0:
        raise ValueError("--weight-decay, --warmup-steps and --max-grad-norm must be 0 or more.")
    if config.eval_steps < 0 or config.checkpoint_steps < 0 or config.keep_checkpoints < 0:
        raise ValueError("--eval-steps, --checkpoint-steps and --keep-checkpoints must be 0 or more (0: only at the "
                         "end, never, all).")
    for flag, value in (("--max-train-samples", config.max_train_samples), ("--max-eval-samples", config.max_eval_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (leave it out to use every row), got {value}.")
    if config.vocab_size != TrainingConfig.vocab_size and not config.preset:
        raise ValueError("--vocab-size sizes the tokenizer of a backbone pretrained with --preset; a domain's own tokens "
                         "are --new-tokens.")
    if not 0.0 <= config.control_token_dropout <= 1.0:
        raise ValueError(f"control_token_dropout must be in [0, 1], got {config.control_token_dropout}.")
    if config.lr_scheduler not in {s.value for s in SchedulerType}:
        raise ValueError(f"Unknown --lr-scheduler {config.lr_scheduler!r}; choose one of "
                         f"{', '.join(s.value for s in SchedulerType)}.")
    _check_run_folder(config)


def _check_run_folder(config: TrainingConfig) -> None:
    """Refuse what would lose work: training over a run without --resume/--overwrite, resuming another run."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {output_dir} is a file; choose a folder.")
    has_run = (output_dir / RUN_CONFIG_FILE).is_file()
    checkpoints = _checkpoint_folders(output_dir)
    finished = (output_dir / FINAL_MODEL_FOLDER).exists()
    if config.resume and config.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite starts it again: pass one.")
    if config.resume:
        if not has_run:
            raise FileNotFoundError(f"Nothing to resume: {output_dir} holds no {RUN_CONFIG_FILE}.")
        saved = read_run_config(output_dir)["settings"]
        changed = {k: (saved.get(k), v) for k, v in config.run_signature().items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"{output_dir} holds a checkpoint of another run; these settings differ: {details}. "
                             "Resume with the settings the run started with, or start again with --overwrite.")
        if not checkpoints:
            if finished:
                raise FileExistsError(f"The run in {output_dir} has finished (its model is in "
                                      f"{output_dir / FINAL_MODEL_FOLDER}); there is nothing to resume. Pass "
                                      "--overwrite instead of --resume to train it again.")
            raise FileNotFoundError(f"Nothing to resume: no checkpoint in {output_dir / CHECKPOINTS_FOLDER} (the run "
                                    "stopped before its first one). Run again without --resume to start it over.")
        return
    if has_run and (checkpoints or finished) and not config.overwrite:
        holds = ", ".join(filter(None, [f"{len(checkpoints)} checkpoint(s)" if checkpoints else "",
                                        "its trained model" if finished else ""]))
        raise FileExistsError(f"{output_dir} already holds a run ({holds}): pass --resume to continue it, "
                              "--overwrite to train it again from the start (its checkpoints and model are "
                              "replaced), or pick another --output-dir. Nothing was changed.")
    if not has_run and output_dir.is_dir() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty and holds no {RUN_CONFIG_FILE}: refusing to write a training "
                              "run among files this library did not write. Choose a new or empty --output-dir.")
    # The model is saved at the end: find out now, not after training, if that place is taken by something else.
    check_replaceable(output_dir / FINAL_MODEL_FOLDER, ("config.json",))


def read_run_config(output_dir: str | Path) -> dict:
    """The `run_config.json` of a run folder: `{"settings", "fingerprints", "versions"}`."""
    path = Path(output_dir) / RUN_CONFIG_FILE
    fix = "restore it, or start the run again with --overwrite."
    saved = read_json_file(path, "run config", fix)
    if saved.get("format") != _RUN_CONFIG_FORMAT or not isinstance(saved.get("settings"), dict):
        raise DataFileError(f"The run config {path} was written by another version of domain_experts (or damaged), "
                            f"so its checkpoints cannot be checked: {fix}")
    return saved


def _check_distributed_setup(accelerator: Accelerator) -> None:
    """Accelerate turns FSDP and DeepSpeed off without a word where they cannot run (no GPU): say so instead."""
    for setting, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        wanted = os.environ.get(setting, "false").lower() == "true"
        if wanted and accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(f"The Accelerate config asks for {name}, but Accelerate runs {name} on GPUs only and "
                             f"this run got {accelerator.distributed_type.value} (no GPU here?). Launch with "
                             "examples/accelerate_config.yaml (data parallel) instead.")


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------


def load_text_datasets(config: TrainingConfig) -> dict[str | None, tuple[datasets.Dataset, datasets.Dataset]]:
    """The training and validation rows of each domain (None: the backbone's pretraining text), each with the text
    column, checked non-empty."""
    sources = config.domain_sources()
    if any(train_file for train_file, _ in sources.values()):
        return {name: _load_rows(config, train_file, validation_file, f" of domain {name}")
                for name, (train_file, validation_file) in sources.items()}
    (name,) = sources or [None]
    return {name: _load_rows(config, config.train_file, config.validation_file, "")}


def _load_rows(config: TrainingConfig, train_file: str | None, validation_file: str | None,
               owner: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Training and validation rows from files (or `config.dataset`); validation held out of training if none."""
    column = config.text_column
    if train_file is None:
        loaded = datasets.load_dataset(config.dataset, config.dataset_config)
        if "train" not in loaded:
            raise ValueError(f"The dataset {config.dataset} has no 'train' split (it has {list(loaded)}).")
        for split_name, split in loaded.items():
            if column not in split.column_names:
                raise ValueError(f"The {split_name} split of {config.dataset} has no column {column!r}; its columns "
                                 f"are {split.column_names}. Pass --text-column.")
            feature = split.features[column]
            if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
                raise ValueError(f"The column {column!r} of {config.dataset} holds {feature}, not text. Pass the text "
                                 "column with --text-column.")
        train, validation = loaded["train"], loaded.get("validation")
    else:
        train = read_text_file(train_file, column, role=f"training file{owner}")
        validation = read_text_file(validation_file, column, role=f"validation file{owner}") if validation_file else None
    source = train_file or config.dataset
    train = _rows_with_text(train, column, f"training data{owner}", source)
    if validation is not None:
        validation = _rows_with_text(validation, column, f"validation data{owner}", validation_file or config.dataset)
    else:
        held_out = max(1, len(train) * config.validation_split_percentage // 100)
        if held_out >= len(train):
            raise ValueError(f"The training data ({source}) has {len(train)} row(s) with text: too few to hold out "
                             f"{config.validation_split_percentage}% for validation. Pass --validation-file (with "
                             "--domain NAME=TRAIN_FILE,VALIDATION_FILE, after the comma), or more rows.")
        split = train.train_test_split(test_size=held_out, seed=config.seed)
        train, validation = split["train"], split["test"]
    if config.max_train_samples:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples:
        validation = validation.select(range(min(config.max_eval_samples, len(validation))))
    return train, validation


def _rows_with_text(rows: datasets.Dataset, column: str, what: str, source: str) -> datasets.Dataset:
    """`rows` without those whose text is empty or blank (saying how many were dropped); none left is an error."""
    kept = rows.filter(lambda row: bool(row[column] and row[column].strip()), desc=f"Checking the {what}")
    if len(kept) == 0:
        raise ValueError(f"The {what} is empty ({source}): no row has text in column {column!r}.")
    if len(kept) < len(rows):
        logger.warning(f"The {what} ({source}) has {len(rows) - len(kept)} of {len(rows)} rows without text in "
                       f"column {column!r}: they are left out.")
    return kept


def model_to_train(config: TrainingConfig, train_texts: dict[str | None, list[str]],
                   validation_texts: dict[str, list[str] | None] | None = None):
    """The model to train and the tokenizer of each domain (None: a backbone pretrained from scratch, with its own).

    A domain added with tokens of its own (`config.new_tokens`) gets them as `config.token_init` says: with "fit",
    through `domain_experts.token_init.add_domain_with_tokens`, which chooses their number on `validation_texts` (or,
    without, on the last tenth of the training texts, then left out of the fit).
    """
    if config.preset is not None:
        from .scratch import create_backbone, train_tokenizer

        tokenizer = train_tokenizer(train_texts[None], vocab_size=config.vocab_size)
        model = create_backbone(config.preset, tokenizer, seed=config.seed,
                                max_position_embeddings=max(1024, config.block_size))
        return model, {None: tokenizer}
    from .evaluation import load_model

    model = load_model(config.model)
    if model.tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; training needs one.")
    context = _context_length(model)  # checked before a domain's tokens are started (minutes on a real backbone)
    if context is not None and config.block_size > context:
        raise ValueError(f"block_size={config.block_size} is larger than the backbone's context of {context} tokens.")
    adapters = None
    if config.adapter_rank:
        adapters = AdapterConfig(r=config.adapter_rank, alpha=config.adapter_alpha or 2.0 * config.adapter_rank,
                                 target_modules=config.adapter_targets or "all-linear")
    for name in train_texts:
        if config.add_domain:
            set_seed(config.seed)
            _add_domain(model, name, config, adapters, train_texts[name], (validation_texts or {}).get(name))
        elif name not in model.domains:
            known = ", ".join(model.domain_names) or "none"
            raise ValueError(f"Unknown domain {name!r} in {config.model} (it has: {known}); pass --add-domain to "
                             "create it.")
    return model, {name: model.tokenizer.tokenizer_for(name) for name in train_texts}


def _add_domain(model, name: str, config: TrainingConfig, adapters: AdapterConfig | None, texts: list[str],
                validation_texts: list[str] | None) -> None:
    num_blocks = config.num_blocks
    if num_blocks is None:  # adapters alone are LoRA's configuration, the best one in setting M
        num_blocks = 0 if adapters is not None else 4
    domain_kwargs = dict(num_blocks=num_blocks, adapters=adapters, control_embedding=config.control_embedding)
    if not config.new_tokens:
        model.add_domain(name, **domain_kwargs)
    elif config.token_init == "mean":
        if len(config.new_tokens) > 1:
            raise ValueError("Several --new-tokens numbers are chosen between with --token-init fit only.")
        model.add_domain(name, corpus=texts, num_new_tokens=config.new_tokens[0], **domain_kwargs)
        model.config.domains[name]["token_init"] = {"method": "mean of pieces (input and output rows)"}
    else:
        from .token_init import TokenInitConfig, add_domain_with_tokens

        if not validation_texts:
            cut = len(texts) - max(1, len(texts) // 10)
            texts, validation_texts = texts[:cut], texts[cut:]
        add_domain_with_tokens(model, name, list(texts), list(validation_texts)[:100], config.new_tokens,
                               TokenInitConfig(distill_steps=config.token_init_distill_steps,
                                               distill_length=config.token_init_distill_length, seed=config.seed),
                               tolerance=config.token_tolerance, **domain_kwargs)


def _context_length(model) -> int | None:
    config = getattr(model.config, "backbone_config", None) or model.config
    text_config = config.get_text_config(decoder=True)
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


# ----------------------------------------------------------------------------------------------------------------
# What defines a run: fingerprints of its data and of the model and tokenizer it starts from
# ----------------------------------------------------------------------------------------------------------------


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 of a list of texts (each length-prefixed, so the split into texts counts too)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def tensors_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every tensor of `model` (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, merges and special tokens (its serialized fast tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_fingerprints(model, tokenizers: dict, rows: dict, config: TrainingConfig) -> dict[str, str]:
    """What the run starts from, by name (names are those of `--resume`'s messages)."""
    fingerprints = {}
    for name, (train_rows, validation_rows) in rows.items():
        suffix = f" ({name})" if len(rows) > 1 else ""
        fingerprints[f"training data{suffix}"] = texts_fingerprint(train_rows[config.text_column])
        fingerprints[f"validation data{suffix}"] = texts_fingerprint(validation_rows[config.text_column])
        fingerprints[f"tokenizer{suffix}"] = tokenizer_fingerprint(tokenizers[name])
    fingerprints["starting model"] = tensors_fingerprint(model)
    return fingerprints


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("domain_experts", "torch", "transformers", "accelerate")}


def _run_config(config: TrainingConfig, fingerprints: dict[str, str]) -> dict:
    run = {"format": _RUN_CONFIG_FORMAT, "settings": config.run_signature(), "fingerprints": fingerprints}
    run["run_id"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
    return run | {"versions": _versions()}


def _check_same_start(saved: dict, fingerprints: dict[str, str], config: TrainingConfig) -> None:
    """Refuse to resume a run whose data, starting model or tokenizer changed since it started."""
    sources = {"training data": config.train_file or config.dataset, "validation data": config.validation_file,
               "starting model": config.model or f"--preset {config.preset}", "tokenizer": config.model}
    for name, (train_file, validation_file) in config.domain_sources().items():
        sources |= {f"training data ({name})": train_file, f"validation data ({name})": validation_file}
    changed = [name for name, value in fingerprints.items() if saved["fingerprints"].get(name) != value]
    if changed:
        details = "; ".join(
            f"the {name}{f' ({sources[name]})' if sources.get(name) else ''}: sha256 "
            f"{str(saved['fingerprints'].get(name))[:12]}... when the run started, {fingerprints[name][:12]}... now"
            for name in changed)
        raise ValueError(f"Cannot resume the run in {config.output_dir}: what it trains on changed since it started "
                         f"({details}). Resume with the data and model it started with, or start again with "
                         "--overwrite.")
    now = _versions()
    if saved.get("versions") != now:
        logger.warning(f"The run started under {saved.get('versions')} and resumes under {now}: the result may differ "
                       "slightly from an uninterrupted run.")


# ----------------------------------------------------------------------------------------------------------------
# Data into blocks
# ----------------------------------------------------------------------------------------------------------------


def tokenize_into_blocks(rows: datasets.Dataset, tokenizer, config: TrainingConfig, length: int,
                         what: str = "text") -> datasets.Dataset:
    """Rows of `length` token ids (`input_ids`): texts (each ended by EOS) packed end to end, or each truncated to
    `length`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[config.text_column], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    tokenized = rows.map(tokenize, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing the {what}")
    if not config.packing:
        return tokenized.map(lambda row: {"input_ids": row["input_ids"][:length]},
                             desc=f"Truncating the {what} to {length} tokens")

    def pack(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        return {"input_ids": [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]}

    return tokenized.map(pack, batched=True, batch_size=1000, desc=f"Packing the {what} into blocks of {length} tokens")


class MixedBatchSampler(torch.utils.data.Sampler):
    """The batches of a whole run: each holds `rows_per_domain` rows of every domain, interleaved (so that every
    process of a split batch gets rows of each), a domain's rows drawn from its own order.

    A domain's order depends only on the seed and its name (a new permutation of its rows each time they run out), so a
    domain takes the same rows at each step whatever other domains share the run, and a resumed run replays them.

    Args:
        domain_rows (`list[tuple[str | None, int, int]]`): each domain's name, and the start and number of its rows in
            the concatenated dataset.
        rows_per_domain (`int`): rows of each domain per batch.
        num_batches (`int`): batches in the run (optimizer steps times gradient accumulation).
        seed (`int`): the run's seed.
    """

    def __init__(self, domain_rows: list[tuple[str | None, int, int]], rows_per_domain: int, num_batches: int,
                 seed: int):
        self.domain_rows = domain_rows
        self.rows_per_domain = rows_per_domain
        self.num_batches = num_batches
        self.seed = seed
        self.batch_size = rows_per_domain * len(domain_rows)  # Accelerate splits batches of this size

    def __len__(self) -> int:
        return self.num_batches

    def _order(self, name: str | None, count: int, epoch: int) -> list[int]:
        key = f"{self.seed}/{name}/{epoch}".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        return torch.randperm(count, generator=generator).tolist()

    def __iter__(self):
        orders: dict = {}
        for batch in range(self.num_batches):
            columns = []
            for name, start, count in self.domain_rows:
                rows = []
                for position in range(batch * self.rows_per_domain, (batch + 1) * self.rows_per_domain):
                    epoch = position // count
                    if orders.get(name, (None,))[0] != epoch:
                        orders[name] = (epoch, self._order(name, count, epoch))
                    rows.append(start + orders[name][1][position % count])
                columns.append(rows)
            yield [index for row in zip(*columns) for index in row]


class Collator:
    """Pads rows on the right and, in domain training, routes each row to its domain: its control token first on the
    steps that keep it, and `domain_ids` always.

    Whether a step keeps the control tokens depends only on (seed, step), so a resumed run sees the same batches.
    Steps without them train the domains to serve rows the learned gate routes to them.

    Args:
        pad_token_id (`int`): the padding id.
        control_token_ids (`list[int]`, *optional*): each domain's control token, by domain index (None: no domain).
        control_token_dropout (`float`): share of steps without control tokens.
        seed (`int`): the run's seed.
    """

    def __init__(self, pad_token_id: int, control_token_ids: list[int] | None, control_token_dropout: float,
                 seed: int):
        self.pad_token_id = pad_token_id
        self.control_token_ids = control_token_ids
        self.control_token_dropout = control_token_dropout
        self.seed = seed

    def __call__(self, rows: list[dict], step: int) -> dict:
        keep_control = random.Random(f"{self.seed}/{step}").random() >= self.control_token_dropout
        domains = [row["domain"] for row in rows]
        sequences = [([self.control_token_ids[domain]] if self.control_token_ids and keep_control else [])
                     + row["input_ids"] for row, domain in zip(rows, domains)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": input_ids.masked_fill(attention_mask == 0, -100)}
        if self.control_token_ids:
            batch["domain_ids"] = torch.tensor(domains, dtype=torch.long)
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


def domain_balanced_loss(logits: torch.Tensor, labels: torch.LongTensor, domain_ids: torch.LongTensor | None,
                         num_domains: int, accelerator: Accelerator) -> torch.Tensor:
    """The sum over domains of each domain's mean token loss over the whole batch (all processes), as a process's
    share of it: DDP averages the processes' gradients, so their losses sum to the batch's.

    Each domain's parameters get the gradient of its own rows' mean loss, the same as if the domain trained alone on
    those rows; with one domain (or none) it is the usual mean token loss.

    Args:
        logits (`torch.FloatTensor` of shape `(batch, length, vocab)`), labels (`torch.LongTensor` of shape
            `(batch, length)`): targets shifted inside, -100 ignored.
        domain_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): each row's domain index (None: one group).
        num_domains (`int`): how many domains the model has (domain indices are below it).
    """
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                     ignore_index=-100, reduction="none")
    groups = domain_ids + 1 if domain_ids is not None else torch.zeros(labels.shape[0], dtype=torch.long)
    groups = groups.to(labels.device)
    counts = torch.zeros(num_domains + 1, device=labels.device).index_add(0, groups, (targets != -100).sum(dim=1).float())
    counts = accelerator.reduce(counts, reduction="sum")  # target tokens of each domain in the whole batch
    row_losses = token_losses.sum(dim=1)
    return (row_losses / counts[groups].clamp(min=1)).sum() * accelerator.num_processes


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_folders(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    return sorted(p for p in folder.glob("checkpoint-*") if p.is_dir()) if folder.is_dir() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint folder (a save killed midway never becomes one; see `find_resumable_checkpoint`)."""
    checkpoints = _checkpoint_folders(output_dir)
    return checkpoints[-1] if checkpoints else None


def _on_main_process(accelerator: Accelerator, work):
    """Run `work()` on the main process only and return its result, or raise its error, on every process."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("result", work())]
        except (OSError, ValueError) as error:
            outcome = [("error", error)]
    (kind, value), = broadcast_object_list(outcome)
    if kind == "error":
        raise value
    return value


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int,
                    run_id: str | None = None) -> Path:
    """`accelerator.save_state` into a staging folder, renamed into place once every process has written its part.

    The checkpoint's `checkpoint_manifest.json` records the size and sha256 of every file (and `run_id`, the run it
    belongs to), checked by `find_resumable_checkpoint`. Keeps the `keep` newest checkpoints (0: all).
    """
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    final = folder / f"checkpoint-{step:08d}"
    with ExitStack() as stack:
        staging = None
        if accelerator.is_main_process:
            staging = stack.enter_context(writing_folder(final, _CHECKPOINT_MARKERS))
        (staging,) = broadcast_object_list([staging])
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_file_atomically(staging / TRAINER_STATE_FILE, json.dumps({"completed_steps": step}))
            manifest = {"completed_steps": step, "run_id": run_id, "files": folder_manifest(staging)}
            write_file_atomically(staging / CHECKPOINT_MANIFEST_FILE, json.dumps(manifest, indent=2))
    if accelerator.is_main_process and keep > 0:
        for old in _checkpoint_folders(output_dir)[:-keep]:
            remove_folder(old, _CHECKPOINT_MARKERS)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problems(checkpoint: Path, run_id: str | None = None) -> list[str]:
    """Why `checkpoint` cannot be resumed from (empty when it is intact and belongs to run `run_id`)."""
    try:
        manifest = read_json_file(checkpoint / CHECKPOINT_MANIFEST_FILE, "checkpoint manifest", "")
    except (OSError, ValueError) as error:
        return [f"{CHECKPOINT_MANIFEST_FILE} is missing or damaged ({str(error).rstrip(': ')})"]
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("completed_steps"), int):
        return [f"{CHECKPOINT_MANIFEST_FILE} is damaged (no file list or step)"]
    if run_id is not None and manifest.get("run_id") != run_id:
        return ["it belongs to another run (its run_id differs from run_config.json's)"]
    return verify_folder_manifest(checkpoint, manifest["files"])


def find_resumable_checkpoint(output_dir: str | Path, run_id: str | None = None) -> tuple[Path, list[Path]]:
    """The newest intact checkpoint of run `run_id`, and the newer ones that are damaged.

    Every file of a checkpoint is checked against the size and sha256 its manifest recorded when it was saved.

    Raises:
        DataFileError: no checkpoint is intact; the message says what is wrong with each.
    """
    problems, damaged = [], []
    for checkpoint in reversed(_checkpoint_folders(output_dir)):
        found = checkpoint_problems(checkpoint, run_id)
        if not found:
            return checkpoint, damaged
        problems.append(f"{checkpoint.name}: {'; '.join(found)}")
        damaged.append(checkpoint)
    raise DataFileError(f"No intact checkpoint to resume from in {Path(output_dir) / CHECKPOINTS_FOLDER}: "
                        f"{' / '.join(problems)}. Restore the files, or start again with --overwrite.")


def _resume(accelerator: Accelerator, output_dir: Path, run_id: str) -> int:
    """Load the newest intact checkpoint (moving damaged newer ones aside, saying so); return its step."""

    def choose():
        checkpoint, damaged = find_resumable_checkpoint(output_dir, run_id)
        for folder in damaged:
            aside = folder.with_name(DAMAGED_PREFIX + folder.name)
            for number in range(2, 1000):
                if not aside.exists():
                    break
                aside = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}.{number}")
            folder.rename(aside)
            logger.warning(f"{folder} is damaged ({'; '.join(checkpoint_problems(aside, run_id))}): moved aside to "
                           f"{aside.name}; resuming from {checkpoint.name}, the newest intact checkpoint.")
        return checkpoint

    checkpoint = _on_main_process(accelerator, choose)
    accelerator.load_state(str(checkpoint))
    state = read_json_file(checkpoint / TRAINER_STATE_FILE, "trainer state", "start again with --overwrite.")
    logger.info(f"Resuming from {checkpoint} at step {state['completed_steps']}.")
    return state["completed_steps"]


def _checkpoint_trainable_tensors_only(accelerator: Accelerator) -> None:
    """Make `save_state`/`load_state` keep the trainable tensors only (`trainable.safetensors`).

    A frozen backbone never goes into a checkpoint: a resumed run loads it from its source (checked against the run's
    `starting model` fingerprint), so no damaged or stale checkpoint can change it. FSDP and DeepSpeed save their
    sharded model themselves (the hooks then see no weights), whole, and the manifest checks it.
    """

    def save(models, weights, output_dir):
        if not weights:
            return
        weights.clear()  # accelerate saves nothing more of the model
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, os.path.join(output_dir, TRAINABLE_WEIGHTS_FILE))

    def load(models, input_dir):
        if not models:
            return
        model = accelerator.unwrap_model(models.pop())
        path = os.path.join(input_dir, TRAINABLE_WEIGHTS_FILE)
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as error:
            raise DataFileError(f"Cannot read the checkpoint's trainable tensors {path}: {error}.") from None
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if tensors.keys() != parameters.keys() or any(tensors[n].shape != p.shape for n, p in parameters.items()):
            raise DataFileError(f"{path} does not hold this run's trainable tensors; start again with --overwrite.")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[name])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator: Accelerator, domain_names: list[str] | None = None) -> dict:
    """Validation loss and perplexity per target token, over all processes; with `domain_names`, each domain's too
    (`eval_loss_NAME`)."""
    model.eval()
    totals: dict[int, list[float]] = {}
    for batch in dataloader:
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        domains = batch.get("domain_ids", torch.full((labels.shape[0],), BASE_ROUTE, device=labels.device))
        # Per row, so that `gather_for_metrics` can drop the rows repeated to fill the last batch of a process.
        row_loss, row_tokens, row_domain = accelerator.gather_for_metrics(
            (losses.sum(dim=1), (labels != -100).sum(dim=1), domains.to(labels.device)))
        for loss, tokens, domain in zip(row_loss.tolist(), row_tokens.tolist(), row_domain.tolist()):
            total = totals.setdefault(domain, [0.0, 0])
            total[0] += loss
            total[1] += tokens
    model.train()
    mean = sum(loss for loss, _ in totals.values()) / max(sum(tokens for _, tokens in totals.values()), 1)
    metrics = {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50))}
    if domain_names and len(totals) > 1:
        metrics |= {f"eval_loss_{domain_names[domain]}": loss / max(tokens, 1) for domain, (loss, tokens) in totals.items()}
    return metrics


def train(config: TrainingConfig):
    """Run training as `config` says; return the trained model (unwrapped) after saving it to `output_dir/model`.

    The run folder is held for the whole run: a second run started on the same folder stops at once with an error.
    """
    with ExitStack() as stack:
        if os.environ.get("RANK", "0") == "0":  # the main process (Accelerate is not set up yet)
            stack.enter_context(working_in_folder(config.output_dir, "a training run"))
        return _train(config)


def _optimizer_groups(model, trainable: list[torch.nn.Parameter], config: TrainingConfig) -> list[dict]:
    """AdamW's parameter groups: one, or, with `config.token_learning_rate`, the domains' token rows apart at theirs."""
    if config.token_learning_rate is None:
        return [{"params": trainable}]
    token_rows = {id(getattr(domain, name)) for domain in model.domains.values()
                  for name in DomainExpansion.token_parameter_names if getattr(domain, name) is not None}
    groups = [{"params": [p for p in trainable if id(p) not in token_rows]},
              {"params": [p for p in trainable if id(p) in token_rows], "lr": config.token_learning_rate}]
    return [group for group in groups if group["params"]]


def _clip_groups(trainable: dict[str, torch.nn.Parameter], groups: list[str | None]) -> list[list]:
    """The parameters whose gradient norm is clipped together: each domain's blocks and adapters, and apart from them
    its token rows (`DomainExpansion.token_parameter_names`), so that each domain is clipped as if it trained alone,
    and the gradient of its control token's row (the first position, where attention gathers) does not set the
    clipping of its blocks and adapters. In setting M of `benchmarks/compare_methods.py` (SmolLM2, recipes, rank-46
    adapters, 200 steps), adapters clipped with that row's gradient read the test texts 0.6% worse (0.8093 against
    0.8045 bits per character, the row held at BOS's either way) than clipped alone, and worse than peft's LoRA.

    Args:
        trainable: the trainable parameters of the prepared model, by name.
        groups: the domains trained (None: the whole backbone).
    """
    clip_groups = []
    for group in groups:
        names = [name for name in trainable if _in_group(name, group)]
        token_rows = [name for name in names if name.rsplit(".", 1)[-1] in DomainExpansion.token_parameter_names]
        clip_groups += [[trainable[name] for name in part]
                        for part in ([name for name in names if name not in token_rows], token_rows) if part]
    return clip_groups


def _in_group(parameter_name: str, group: str | None) -> bool:
    """Whether a parameter (by its name in the prepared model) belongs to domain `group` (None: the backbone)."""
    return group is None or f"domains.{group}." in parameter_name


def _train(config: TrainingConfig):
    _validate(config)
    output_dir = Path(config.output_dir)
    rows = load_text_datasets(config)
    model, tokenizers = model_to_train(
        config, {name: train[config.text_column] for name, (train, _) in rows.items()},
        {name: validation[config.text_column] if validation is not None else None
         for name, (_, validation) in rows.items()})
    run_config = _run_config(config, run_fingerprints(model, tokenizers, rows, config))
    if config.resume:
        _check_same_start(read_run_config(output_dir), run_config["fingerprints"], config)

    is_domain = config.preset is None
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_dir=str(output_dir),
        # The batch is global and split across processes: results do not depend on the number of processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # Steps without the control token leave its embedding unused (DDP would otherwise stop at the next step).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=is_domain)],
        # Several processes and no GPU: gloo processes on the CPU.
        cpu=world_size > 1 and not torch.cuda.is_available(),
    )
    _check_distributed_setup(accelerator)
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {accelerator.num_processes} "
                         "processes.")
    set_seed(config.seed)

    # Each domain's text in blocks of its own tokenizer's tokens, tagged with the domain's index.
    length = config.block_size - 1 if is_domain else config.block_size  # room for the control token
    domain_index = {name: (model.domain_names.index(name) if is_domain else BASE_ROUTE) for name in rows}
    train_parts, validation_parts = [], []
    with accelerator.main_process_first():
        for name, (train_rows, validation_rows) in rows.items():
            owner = f" of domain {name}" if len(rows) > 1 else ""
            train_blocks = tokenize_into_blocks(train_rows, tokenizers[name], config, length, f"training text{owner}")
            validation_blocks = tokenize_into_blocks(validation_rows, tokenizers[name], config, length,
                                                     f"validation text{owner}")
            if len(validation_blocks) == 0:
                validation_blocks = tokenize_into_blocks(validation_rows, tokenizers[name],
                                                         dataclasses.replace(config, packing=False), length,
                                                         f"validation text{owner}")
            if len(train_blocks) < config.batch_size // len(rows):
                raise ValueError(f"The training text{owner} makes {len(train_blocks)} blocks of {config.block_size} "
                                 f"tokens, fewer than one batch's {config.batch_size // len(rows)}; lower "
                                 "--batch-size or --block-size, or pass --no-packing.")
            train_parts.append(train_blocks.add_column("domain", [domain_index[name]] * len(train_blocks)))
            validation_parts.append(validation_blocks.add_column("domain",
                                                                 [domain_index[name]] * len(validation_blocks)))
    train_blocks = datasets.concatenate_datasets(train_parts)
    validation_blocks = datasets.concatenate_datasets(validation_parts)
    starts = [sum(len(part) for part in train_parts[:i]) for i in range(len(train_parts))]
    domain_rows = [(name, start, len(part)) for name, start, part in zip(rows, starts, train_parts)]

    if is_domain:
        model.requires_grad_(False)
        parameter_groups = {name: [p for n, p in model.domains[name].named_parameters() if not n.startswith("gate_")]
                            for name in rows}
        for parameter in (p for group in parameter_groups.values() for p in group):
            parameter.requires_grad_(True)
        control_token_ids = [model.control_token_id(name) for name in model.domain_names]
        collator = Collator(tokenizers[next(iter(rows))].pad_token_id or 0, control_token_ids,
                            config.control_token_dropout, config.seed)
    else:
        parameter_groups = {None: list(model.parameters())}
        collator = Collator(tokenizers[None].pad_token_id or 0, None, 0.0, config.seed)
    logger.info(f"Training {sum(p.numel() for group in parameter_groups.values() for p in group):,} parameters "
                f"({'domains ' + ', '.join(rows) if is_domain else 'the whole backbone'}).")

    sampler = MixedBatchSampler(domain_rows, config.batch_size // len(rows),
                                config.max_steps * config.gradient_accumulation_steps, config.seed)
    train_loader = torch.utils.data.DataLoader(
        train_blocks, batch_sampler=sampler, collate_fn=_StepCollator(collator, config.gradient_accumulation_steps))
    eval_loader = torch.utils.data.DataLoader(
        validation_blocks, batch_size=config.batch_size, collate_fn=lambda batch_rows: collator(batch_rows, step=0))
    trainable = [p for group in parameter_groups.values() for p in group]
    optimizer = torch.optim.AdamW(_optimizer_groups(model, trainable, config), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    # FSDP replaces the parameters by sharded ones: find each domain's again, by name.
    named = dict(model.named_parameters())
    clip_groups = _clip_groups({n: p for n, p in named.items() if p.requires_grad}, list(parameter_groups))
    _checkpoint_trainable_tensors_only(accelerator)

    completed_steps = 0
    if config.resume:
        completed_steps = _resume(accelerator, output_dir, run_config["run_id"])
    elif accelerator.is_main_process:
        for old in _checkpoint_folders(output_dir):  # --overwrite: the old run's checkpoints go now
            remove_folder(old, _CHECKPOINT_MARKERS)
        write_file_atomically(output_dir / RUN_CONFIG_FILE, json.dumps(run_config, indent=2))
    accelerator.wait_for_everyone()
    if config.report_to:
        accelerator.init_trackers("domain_experts", config=dataclasses.asdict(config))
        if not accelerator.trackers:
            raise ValueError(f"Tracker {config.report_to!r} is not installed.")

    domain_names = accelerator.unwrap_model(model).domain_names if is_domain else None
    num_domains = len(domain_names) if is_domain else 0
    what = (f"domain{'s' if len(rows) > 1 else ''} {', '.join(rows)}") if is_domain else "the backbone"
    progress = tqdm(total=config.max_steps, initial=completed_steps, unit="step", desc=f"Training {what}",
                    disable=not accelerator.is_local_main_process)
    model.train()
    # The batches of the whole run in order (MixedBatchSampler): a resumed run skips those already trained on.
    train_loader.collate_fn.calls = completed_steps * config.gradient_accumulation_steps
    loader = train_loader
    if completed_steps:
        loader = accelerator.skip_first_batches(train_loader, completed_steps * config.gradient_accumulation_steps)
    for batch in loader:
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss = domain_balanced_loss(logits, labels, batch.get("domain_ids"), num_domains, accelerator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                for group in clip_groups:
                    accelerator.clip_grad_norm_(group, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        completed_steps += 1
        progress.update(1)
        logs = {"loss": loss.item() / max(len(rows), 1), "lr": scheduler.get_last_lr()[0]}
        progress.set_postfix(loss=f"{logs['loss']:.3f}")
        accelerator.log(logs, step=completed_steps)
        if config.eval_steps and completed_steps % config.eval_steps == 0 and completed_steps < config.max_steps:
            metrics = evaluate_loss(model, eval_loader, accelerator, domain_names)
            accelerator.log(metrics, step=completed_steps)
            logger.info(f"step {completed_steps}: {metrics}")
        if config.checkpoint_steps and completed_steps % config.checkpoint_steps == 0:
            save_checkpoint(accelerator, output_dir, completed_steps, config.keep_checkpoints, run_config["run_id"])
        if completed_steps >= config.max_steps:
            break
    progress.close()

    metrics = evaluate_loss(model, eval_loader, accelerator, domain_names)
    accelerator.log(metrics, step=completed_steps)
    if accelerator.is_main_process:
        logger.warning(f"Finished {completed_steps} steps: validation loss {metrics['eval_loss']:.4f}, "
                       f"perplexity {metrics['eval_perplexity']:.2f}.")
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
    model = accelerator.unwrap_model(model)
    for name in rows if is_domain else []:
        record = model.config.domains[name].get("token_init")
        if record and record.get("new_tokens", 1):
            # How the tokens went on after their start (kept in the config, so in packs): trained with the domain.
            record.setdefault("trained", []).append({
                "steps": completed_steps, "learning_rate": config.learning_rate,
                "token_learning_rate": config.token_learning_rate or config.learning_rate,
                "block_size": config.block_size, "batch_size": config.batch_size,
                "with": "the domain's blocks and adapters (domain_experts.train)"})
    if accelerator.is_main_process:

        def write(folder: Path) -> None:
            model.save_pretrained(folder, state_dict=state_dict)
            if not is_domain:
                tokenizers[None].save_pretrained(folder)
            (folder / "eval_results.json").write_text(json.dumps(metrics, indent=2))

        write_folder_atomically(output_dir / FINAL_MODEL_FOLDER, write, replaceable="config.json")
        logger.warning(f"Saved the model in {output_dir / FINAL_MODEL_FOLDER}.")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model
