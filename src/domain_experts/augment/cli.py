"""The `domain-experts augment` command."""

import argparse
import dataclasses
import os
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

from .config import AugmentConfig, QualityConfig
from .prompts import STRATEGIES


def load_rows(path: str, split: str = "train") -> Dataset:
    """Rows from a `.jsonl`/`.json`, `.csv` or `.parquet` file, or from a folder written by `save_to_disk`."""
    location = Path(path)
    if location.is_dir():
        loaded = load_from_disk(str(location))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} holds splits {list(loaded)}, not {split!r}; pick one with --split.")
            loaded = loaded[split]
        return loaded
    readers = {".jsonl": Dataset.from_json, ".json": Dataset.from_json, ".csv": Dataset.from_csv,
               ".parquet": Dataset.from_parquet}
    if location.suffix not in readers:
        raise ValueError(f"Cannot read {path}: give a .jsonl, .json, .csv or .parquet file or a save_to_disk folder.")
    if not location.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    return readers[location.suffix](str(location))


def _parse_template(value: str) -> tuple[str, str]:
    strategy, separator, path = value.partition("=")
    if not separator or strategy not in STRATEGIES:
        raise argparse.ArgumentTypeError(f"expected STRATEGY=FILE with STRATEGY in {sorted(STRATEGIES)}, got {value!r}")
    return strategy, Path(path).read_text(encoding="utf-8")


def run_augment(args: argparse.Namespace) -> None:
    """Build the generator, the configs and the optional scorer from `args`, augment, save, print the report."""
    from .generators import EndpointGenerator, TransformersGenerator
    from .pipeline import DATASET_FOLDER, augment
    from .quality import ReferenceScorer

    given = vars(args)
    config = AugmentConfig.from_json_file(args.config) if args.config else AugmentConfig()
    overrides = {f.name: given[f.name] for f in dataclasses.fields(AugmentConfig) if f.name in given}
    if args.template:
        overrides["templates"] = {**config.templates, **dict(args.template)}
    config = AugmentConfig.from_dict({**config.to_dict(), **overrides})
    quality = QualityConfig.from_json_file(args.quality_config) if args.quality_config else QualityConfig()
    overrides = {f.name: given[f.name] for f in dataclasses.fields(QualityConfig) if f.name in given}
    quality = QualityConfig.from_dict({**quality.to_dict(), **overrides})

    dataset = load_rows(args.data, args.split)
    eval_dataset = [load_rows(path, args.split) for path in args.eval_data]
    if args.endpoint:
        generator = EndpointGenerator(
            args.endpoint, model=args.endpoint_model, api_key=os.environ.get(args.api_key_env) or None,
            timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency,
        )
    else:
        generator = TransformersGenerator.from_pretrained(args.model, gguf_file=args.gguf_file,
                                                          batch_size=args.batch_size, device=args.device)
    scorer = None
    if args.reference_model:
        scorer = ReferenceScorer.from_pretrained(args.reference_model, gguf_file=args.reference_gguf_file,
                                                 batch_size=args.batch_size)
    result = augment(dataset, generator, config, quality, eval_dataset=eval_dataset, scorer=scorer,
                     output_dir=args.output)
    print(result.report)
    print(f"kept rows: {Path(args.output) / DATASET_FOLDER} (datasets.load_from_disk)")


def add_augment_command(commands: argparse._SubParsersAction) -> None:
    """Add `augment` to the `domain-experts` subcommands."""
    parser = commands.add_parser(
        "augment",
        help="generate new training rows with an LLM, quality-controlled",
        description="Write new QA pairs or paraphrased documents from a dataset with a local model or an "
        "OpenAI-compatible endpoint, drop what fails quality control, and save the rest with provenance. "
        "Generations are stored as they arrive: rerun the same command to resume.",
    )
    keep = argparse.SUPPRESS  # options left out keep the value of --config / the defaults
    parser.add_argument("data", help="source rows: .jsonl/.json/.csv/.parquet file or a save_to_disk folder")
    parser.add_argument("--output", required=True, help="folder for the store, kept and dropped rows, and the report")
    parser.add_argument("--eval-data", action="append", default=[], metavar="PATH",
                        help="evaluation rows that generated rows must not repeat (repeatable)")
    parser.add_argument("--split", default="train", help="split to read from a DatasetDict folder")

    generator = parser.add_argument_group("generator (one of --model and --endpoint)").add_mutually_exclusive_group(
        required=True)
    generator.add_argument("--model", help="a local causal LM: Hub id or folder (with --gguf-file for GGUF)")
    generator.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    options = parser.add_argument_group("generator options")
    options.add_argument("--gguf-file", help="GGUF file inside --model")
    options.add_argument("--device", help="device of the local model (default: CPU)")
    options.add_argument("--batch-size", type=int, default=8, help="prompts per batch of the local model")
    options.add_argument("--endpoint-model", help="the `model` field sent to the endpoint")
    options.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    options.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request")
    options.add_argument("--max-retries", type=int, default=3, help="retries of a failed endpoint request")
    options.add_argument("--concurrency", type=int, default=8, help="endpoint requests in flight")

    what = parser.add_argument_group("what to generate (override --config)")
    what.add_argument("--config", help="an AugmentConfig JSON file (e.g. augment_config.json of an earlier run)")
    what.add_argument("--task", choices=["qa", "text"], default=keep)
    what.add_argument("--strategies", nargs="+", choices=sorted(STRATEGIES), default=keep)
    what.add_argument("--rewrites-per-row", type=int, default=keep)
    what.add_argument("--num-new-pairs", type=int, default=keep)
    what.add_argument("--num-shots", type=int, default=keep)
    what.add_argument("--labels", nargs="+", default=keep, help="allowed answers (default: those of the data)")
    what.add_argument("--template", action="append", type=_parse_template, default=[], metavar="STRATEGY=FILE",
                      help="replace a strategy's prompt template (a str.format file)")
    for column in ("question", "answer", "explanation", "context", "text"):
        what.add_argument(f"--{column}-column", default=keep)
    what.add_argument("--max-new-tokens", type=int, default=keep)
    what.add_argument("--temperature", type=float, default=keep)
    what.add_argument("--top-p", type=float, default=keep)
    what.add_argument("--system-prompt", default=keep)
    what.add_argument("--seed", type=int, default=keep)

    keep_what = parser.add_argument_group("what to keep (override --quality-config)")
    keep_what.add_argument("--quality-config", help="a QualityConfig JSON file")
    keep_what.add_argument("--min-words", type=int, default=keep)
    keep_what.add_argument("--max-words", type=int, default=keep)
    keep_what.add_argument("--near-duplicate-threshold", type=float, default=keep)
    keep_what.add_argument("--eval-overlap-threshold", type=float, default=keep)
    keep_what.add_argument("--shingle-size", type=int, default=keep)
    keep_what.add_argument("--reference-model", help="score rows with this causal LM (needs --min-reference-score)")
    keep_what.add_argument("--reference-gguf-file", help="GGUF file inside --reference-model")
    keep_what.add_argument("--min-reference-score", type=float, default=keep)
    parser.set_defaults(run=run_augment)
