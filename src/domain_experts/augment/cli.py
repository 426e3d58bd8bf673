"""The `domain-experts augment` command."""

import argparse
import dataclasses
import os
import textwrap
from pathlib import Path

from ..files import TEXT_FILE_BUILDERS, check_location, read_text_file
from .config import AugmentConfig, QualityConfig
from .prompts import STRATEGIES


EXAMPLES = """\
examples:
  # rewrite each QA row and write new pairs with a model served by an OpenAI-compatible endpoint (vLLM, TGI, ...)
  domain-experts augment train.jsonl --eval-data test.jsonl --output-dir augmented \\
      --endpoint http://127.0.0.1:8000/v1 --endpoint-model my-model --strategies rewrite new_pairs

  # the same with a local model; rerun the same command after an interruption to resume
  domain-experts augment train.jsonl --eval-data test.jsonl --output-dir augmented \\
      --model HuggingFaceTB/SmolLM2-1.7B-Instruct --batch-size 8
"""


def load_rows(path: str, split: str = "train", role: str = "data file"):
    """Rows from a data file (`files.read_text_file`: json, jsonl, csv, parquet, txt) or a `save_to_disk` folder."""
    location = Path(path)
    if location.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(location))
        except FileNotFoundError:
            raise FileNotFoundError(f"Cannot read the {role} {path}: a folder must be one written by "
                                    "`Dataset.save_to_disk`.") from None
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} holds splits {list(loaded)}, not {split!r}; pick one with --split.")
            loaded = loaded[split]
        return loaded
    return read_text_file(path, column=None, role=role)


def _parse_template(value: str) -> tuple[str, str]:
    strategy, separator, path = value.partition("=")
    if not separator or strategy not in STRATEGIES:
        raise argparse.ArgumentTypeError(f"expected STRATEGY=FILE with STRATEGY in {sorted(STRATEGIES)}, got {value!r}")
    try:
        return strategy, Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read the template file {path}: {error}") from None


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

    for location, role in ((args.model, "generator model"), (args.reference_model, "reference model")):
        if location not in (None, "smollm2"):
            check_location(location, role)
    dataset = load_rows(args.data, args.split, role="source file")
    eval_dataset = [load_rows(path, args.split, role="evaluation file") for path in args.eval_data]
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
                     output_dir=args.output_dir)
    print(result.report)
    print(f"kept rows: {Path(args.output_dir) / DATASET_FOLDER} (datasets.load_from_disk)")


def add_augment_command(commands: argparse._SubParsersAction) -> None:
    """Add `augment` to the `domain-experts` subcommands."""
    parser = commands.add_parser(
        "augment",
        help="generate new training rows with an LLM, quality-controlled",
        description=textwrap.fill(
            "Write new QA pairs or paraphrased documents from a dataset with a local model or an OpenAI-compatible "
            "endpoint, drop what fails quality control, and save the rest with provenance. Generations are stored as "
            "they arrive: rerun the same command to resume.", width=100),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keep = argparse.SUPPRESS  # options left out keep the value of --config / the defaults
    suffixes = "/".join(TEXT_FILE_BUILDERS)
    parser.add_argument("data", help=f"source rows: a {suffixes} file or a save_to_disk folder")
    parser.add_argument("--output-dir", "--output", dest="output_dir", required=True,
                        help="folder for the generation store, the kept and dropped rows, the report and both configs")
    parser.add_argument("--eval-data", action="append", default=[], metavar="PATH",
                        help="evaluation rows that generated rows must not repeat (repeatable)")
    parser.add_argument("--split", default="train", help="split to read from a DatasetDict folder (default: train)")

    generator = parser.add_argument_group("generator (one of --model and --endpoint)").add_mutually_exclusive_group(
        required=True)
    generator.add_argument("--model", help="a local causal LM: Hub id or folder (with --gguf-file for GGUF)")
    generator.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    options = parser.add_argument_group("generator options")
    options.add_argument("--gguf-file", help="GGUF file inside --model")
    options.add_argument("--device", help="device of the local model (default: CPU)")
    options.add_argument("--batch-size", type=int, default=8, help="prompts per batch of the local model (default: 8)")
    options.add_argument("--endpoint-model", help="the `model` field sent to the endpoint")
    options.add_argument("--api-key-env", default="OPENAI_API_KEY",
                         help="environment variable holding the endpoint's API key (default: OPENAI_API_KEY)")
    options.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request (default: 120)")
    options.add_argument("--max-retries", type=int, default=3,
                         help="retries of a failed endpoint request (default: 3)")
    options.add_argument("--concurrency", type=int, default=8, help="endpoint requests in flight (default: 8)")

    what = parser.add_argument_group("what to generate (each overrides --config)")
    what.add_argument("--config", help="an AugmentConfig JSON file (e.g. augment_config.json of an earlier run)")
    what.add_argument("--task", choices=["qa", "text"], default=keep,
                      help="QA rows or text rows (default: detected from the columns)")
    what.add_argument("--strategies", nargs="+", choices=sorted(STRATEGIES), default=keep,
                      help="which strategies run (default: every strategy of the task)")
    what.add_argument("--rewrites-per-row", type=int, default=keep,
                      help="rewrites (or paraphrases) asked for each source row (default: 1)")
    what.add_argument("--num-new-pairs", type=int, default=keep,
                      help="new pairs asked for by new_pairs (default: one per source row)")
    what.add_argument("--num-shots", type=int, default=keep,
                      help="seed examples shown in each new_pairs prompt (default: 3)")
    what.add_argument("--labels", nargs="+", default=keep, help="allowed answers (default: those of the data)")
    what.add_argument("--template", action="append", type=_parse_template, default=[], metavar="STRATEGY=FILE",
                      help="replace a strategy's prompt template with a str.format file (repeatable)")
    for column, default in (("question", "question"), ("answer", "answer"), ("explanation", "explanation"),
                            ("context", "context"), ("text", "text")):
        what.add_argument(f"--{column}-column", default=keep,
                          help=f"the source column holding the {column} (default: {default})")
    what.add_argument("--max-new-tokens", type=int, default=keep, help="tokens per generation at most (default: 256)")
    what.add_argument("--temperature", type=float, default=keep,
                      help="sampling temperature; 0 is greedy decoding (default: 0.7)")
    what.add_argument("--top-p", type=float, default=keep, help="nucleus sampling probability mass (default: 0.95)")
    what.add_argument("--system-prompt", default=keep, help="a system message put before every prompt (chat models)")
    what.add_argument("--seed", type=int, default=keep,
                      help="seed of the run; each generation derives its own from it (default: 0)")

    keep_what = parser.add_argument_group("what to keep (each overrides --quality-config)")
    keep_what.add_argument("--quality-config", help="a QualityConfig JSON file")
    keep_what.add_argument("--min-words", type=int, default=keep,
                           help="fewest words in a row's question (with context) or text (default: 3)")
    keep_what.add_argument("--max-words", type=int, default=keep,
                           help="most words in a row's question or text (default: twice the longest source row)")
    keep_what.add_argument("--near-duplicate-threshold", type=float, default=keep,
                           help="drop a row this similar (character n-gram Jaccard) to a source or kept row "
                                "(default: 0.7)")
    keep_what.add_argument("--eval-overlap-threshold", type=float, default=keep,
                           help="drop a row this similar to an evaluation row (default: 0.5)")
    keep_what.add_argument("--shingle-size", type=int, default=keep,
                           help="the n of the character n-grams (default: 3 for QA, 5 for text)")
    keep_what.add_argument("--reference-model", help="score rows with this causal LM (needs --min-reference-score)")
    keep_what.add_argument("--reference-gguf-file", help="GGUF file inside --reference-model")
    keep_what.add_argument("--min-reference-score", type=float, default=keep,
                           help="with --reference-model: drop rows whose mean answer log-likelihood is below this")
    parser.set_defaults(run=run_augment)
