"""The `domain-experts` command line.

Each command imports what it needs (torch, transformers, datasets) when it runs, so `--help` answers at once. A user
error (bad input, a missing file, a refused overwrite) prints one line, `domain-experts COMMAND: error: ...`, and exits
with status 2.
"""

import argparse
import json
import os
import sys
import textwrap

from .augment.cli import add_augment_command
from .files import TEXT_FILE_BUILDERS, check_location
from .serving import add_serve_command
from .training_config import TRAIN_EXAMPLES, add_training_arguments, training_config_from_arguments


EXAMPLES = """\
examples:
  domain-experts train --model smollm2 --domain recipes --add-domain --train-file recipes.train.jsonl \\
      --output-dir runs/recipes
  domain-experts train-gate runs/recipes/model --data recipes=recipes.train.jsonl \\
      --data none=stories.train.jsonl --output-dir runs/gated
  domain-experts eval runs/gated --data recipes=recipes.test.jsonl --data none=stories.test.jsonl --routing both
  domain-experts info runs/gated

run `domain-experts COMMAND --help` for the flags of a command.
"""


def info(args: argparse.Namespace) -> None:
    """Print what a saved DomainExperts model or a domain pack (folder or Hub repo) holds: backbone, domains, blocks,
    tokens."""
    from .configuration_domain_experts import DomainExpertsConfig
    from .packs import is_pack, read_pack_manifest

    if is_pack(args.path, revision=args.revision, token=args.token):
        pack_info(read_pack_manifest(args.path, revision=args.revision, token=args.token), args.json)
        return
    config = DomainExpertsConfig.from_pretrained(args.path, revision=args.revision, token=args.token)
    backbone = config.backbone_config
    summary = {
        "backbone": {
            "model_type": backbone.model_type,
            "name_or_path": backbone.name_or_path or None,
            "layers": config.num_backbone_layers,
            "vocab_size": config.backbone_vocab_size,
        },
        "vocab_size": config.vocab_size,
        "domains": {
            name: {
                "blocks": len(settings["expansion_layers"]),
                "after_layers": settings["expansion_layers"],
                "control_token": settings["tokens"][0],
                "control_embedding": config.control_embedding_of(name),
                "token_ids": settings["token_ids"],
                **({"pack": settings["pack"]} if settings.get("pack") else {}),
            }
            for name, settings in config.domains.items()
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    b = summary["backbone"]
    print(f"backbone: {b['model_type']} ({b['name_or_path'] or 'unnamed'}), {b['layers']} layers, vocab {b['vocab_size']}")
    if not summary["domains"]:
        print("domains: none")
    for name, d in summary["domains"].items():
        source = f", from pack {d['pack'].get('repo_id') or d['pack']['name']}" if d.get("pack") else ""
        print(f"domain {name}: {d['blocks']} blocks after layers {d['after_layers']}, "
              f"control token {d['control_token']} = {d['token_ids'][0]}, {len(d['token_ids'])} tokens{source}")


# Domain packs ---------------------------------------------------------------------------------------------------


def pack_info(manifest, as_json: bool) -> None:
    """Print what a domain pack holds (from its manifest)."""
    summary = {
        "pack": manifest.name,
        "format_version": manifest.format_version,
        "backbone": manifest.backbone.to_dict(),
        "blocks": len(manifest.expansion_layers),
        "after_layers": manifest.expansion_layers,
        "control_token": manifest.control_token,
        "control_embedding": manifest.control_embedding,
        "tokens": len(manifest.tokens),
        "gate": {"trained": manifest.gate_trained, "layer": manifest.gate_layer},
        "parameters": manifest.num_parameters,
        "files": manifest.files,
        "datasets": manifest.datasets,
        "evaluation": manifest.evaluation,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"domain pack {manifest.name} (format {manifest.format_version}), for backbone {manifest.backbone.describe()}")
    print(f"{len(manifest.expansion_layers)} blocks after layers {manifest.expansion_layers}, control token "
          f"{manifest.control_token} ({'read as BOS' if manifest.control_embedding == 'bos' else 'a row of its own'}), "
          f"{len(manifest.tokens)} tokens of its own, gate "
          f"{'trained' if manifest.gate_trained else 'not trained'}, {manifest.num_parameters:,} parameters")
    if manifest.evaluation:
        print("evaluation: " + ", ".join(f"{k} {v}" for k, v in manifest.evaluation["metrics"].items()))


def _hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN or the saved login)")


def _at_least(minimum: int):
    """argparse type of an integer option that must be `minimum` or more."""
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    parse.__name__ = "integer"  # argparse names the type in its "invalid integer value" message
    return parse


def _location(value: str) -> str:
    """argparse type of a model or pack given as a local folder or a Hub repo id."""
    try:
        return check_location(value)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_parser(commands, name: str, help: str, description: str | None = None, epilog: str | None = None):
    """A command whose examples (`epilog`) keep their line breaks."""
    description = textwrap.fill(description or help[0].upper() + help[1:] + ".", width=100)
    return commands.add_parser(name, help=help, description=description, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def push(args: argparse.Namespace) -> None:
    """Push a pack folder, or one domain of a saved model, to a Hub repo (one commit)."""
    from .packs import is_pack, push_pack_folder

    upload = {"token": args.token, "private": args.private or None, "revision": args.revision,
              "commit_message": args.commit_message}
    if os.path.isdir(args.source) and is_pack(args.source):
        if args.domain or args.dataset or args.evaluation or args.license:
            raise ValueError("--domain, --dataset, --evaluation and --license apply to a model folder; a pack folder "
                             "is pushed as it is.")
        commit = push_pack_folder(args.source, args.repo_id, **upload)
    else:
        if not args.domain:
            raise ValueError(f"{args.source} is not a pack folder: to push a domain of a saved model, name it with "
                             "--domain.")
        from .modeling_domain_experts import DomainExpertsForCausalLM

        model = DomainExpertsForCausalLM.from_pretrained(args.source, token=args.token)
        evaluation = None
        if args.evaluation:
            with open(args.evaluation, encoding="utf-8") as file:
                evaluation = json.load(file)
        commit = model.push_domain_to_hub(args.domain, args.repo_id, datasets=args.dataset, evaluation=evaluation,
                                          license=args.license, **upload)
    print(f"pushed {args.repo_id}: {commit.commit_url}")


def pull(args: argparse.Namespace) -> None:
    """Download a pack from the Hub (checked against its manifest) into a local folder."""
    from .packs import PackManifest, pull_pack

    folder = pull_pack(args.repo_id, args.output, revision=args.revision, token=args.token)
    manifest = PackManifest.from_folder(folder)
    print(f"pulled pack {manifest.name} from {args.repo_id} into {folder}")


def compose(args: argparse.Namespace) -> None:
    """Load packs onto a backbone (or a saved model, keeping its domains) and save the composed model (and/or push
    it)."""
    from .evaluation import load_model
    from .files import write_folder_atomically
    from .packs import load_packs, parse_pack_spec, write_model_card

    if not args.output and not args.push_to:
        raise ValueError("Say where the composed model goes: --output DIR and/or --push-to REPO_ID.")
    packs = [{**parse_pack_spec(spec), "token": args.token} for spec in args.packs]
    backbone_kwargs = {key: value for key, value in (("revision", args.backbone_revision), ("token", args.token)) if value}
    model = load_model(args.backbone, **backbone_kwargs)
    load_packs(model, packs)
    if args.output:

        def write(folder):
            model.save_pretrained(folder)
            write_model_card(model, folder, repo_id=args.push_to)

        write_folder_atomically(args.output, write, replaceable="config.json")
        print(f"saved the model with domains {', '.join(model.domain_names)} in {args.output}")
    if args.push_to:
        commit = model.push_to_hub(args.push_to, token=args.token, private=args.private or None)
        print(f"pushed {args.push_to}: {commit.commit_url}")


def add_pack_commands(commands) -> None:
    push_parser = _add_parser(commands, "push", "push a domain pack to the Hub", epilog="""\
examples:
  domain-experts push recipes-pack alice/recipes
  domain-experts push runs/recipes/model alice/recipes --domain recipes --dataset alice/recipes-corpus
""")
    push_parser.add_argument("source", type=_location, help="a pack folder, or a saved model folder with --domain")
    push_parser.add_argument("repo_id", help="the Hub repo to push to (created if needed)")
    push_parser.add_argument("--domain", help="the domain of the saved model to push")
    push_parser.add_argument("--private", action="store_true", help="create the repo private")
    push_parser.add_argument("--revision", help="the branch to push to (default: main)")
    push_parser.add_argument("--commit-message", help="the message of the commit (default: one naming the domain)")
    push_parser.add_argument("--dataset", action="append", help="a dataset the domain was trained on (repeatable)")
    push_parser.add_argument("--evaluation", help='a JSON file: {"dataset": ..., "split": ..., "metrics": {...}}')
    push_parser.add_argument("--license", help="a license id for the model card")
    _hub_options(push_parser)
    push_parser.set_defaults(run=push)

    pull_parser = _add_parser(commands, "pull", "download a domain pack from the Hub into a folder", epilog="""\
examples:
  domain-experts pull alice/recipes recipes-pack --revision v1
""")
    pull_parser.add_argument("repo_id", help="the Hub repo of the pack")
    pull_parser.add_argument("output", help="the pack folder to write")
    pull_parser.add_argument("--revision", help="a branch or commit (default: main)")
    _hub_options(pull_parser)
    pull_parser.set_defaults(run=pull)

    compose_parser = _add_parser(commands, "compose", "load domain packs onto a backbone into one model", epilog="""\
examples:
  domain-experts compose HuggingFaceTB/SmolLM2-135M alice/recipes law=bob/legal@v1 --output-dir composed
  domain-experts compose HuggingFaceTB/SmolLM2-135M recipes-pack --push-to carol/composed
  domain-experts compose composed legal-pack --output-dir composed-with-legal
""")
    compose_parser.add_argument("backbone", type=_location,
                                help="the backbone (a Hub model id or a local folder), or a saved DomainExperts model "
                                     "whose domains are kept")
    compose_parser.add_argument("packs", nargs="+", metavar="PACK",
                                help="[NAME=]REPO_ID_OR_FOLDER[@REVISION]: NAME= loads the pack under another name")
    compose_parser.add_argument("--output-dir", "--output", dest="output",
                                help="save the composed model (with remote code and card) in this folder")
    compose_parser.add_argument("--push-to", metavar="REPO_ID", help="push the composed model to this Hub repo")
    compose_parser.add_argument("--private", action="store_true", help="with --push-to: create the repo private")
    compose_parser.add_argument("--backbone-revision", help="a branch or commit of the backbone repo")
    _hub_options(compose_parser)
    compose_parser.set_defaults(run=compose)


# Training, the gate, evaluation ----------------------------------------------------------------------------------

EVAL_EXAMPLES = """\
examples:
  # recipes texts through the recipes domain, stories texts on the bare backbone; a table, or --json
  domain-experts eval runs/recipes/model --data recipes=recipes.test.jsonl --data none=stories.test.jsonl

  # through the control token and through the gate, with forgetting against the backbone, saved as JSON
  domain-experts eval runs/gated --data recipes=recipes.test.jsonl --data none=strategyqa.test.jsonl:question \\
      --routing both --reference HuggingFaceTB/SmolLM2-135M --output report.json
"""

GATE_EXAMPLES = """\
examples:
  domain-experts train-gate runs/recipes/model --data recipes=recipes.train.jsonl --data stories=stories.train.jsonl \\
      --data none=strategyqa.train.jsonl:question --max-samples 300 --output-dir runs/gated
"""


def _data_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="NAME=PATH[:COLUMN]",
                        help=f"{what} of a domain NAME, or of 'none' (the bare backbone's own kind of text), in a "
                             f"{'/'.join(TEXT_FILE_BUILDERS)} file; repeatable, files of one NAME add up")
    parser.add_argument("--text-column", default="text",
                        help="the column holding the text, where a --data spec names none (default: text)")
    parser.add_argument("--max-samples", type=_at_least(1), help="use the first N texts of each file")


def evaluate_command(args: argparse.Namespace) -> None:
    """`domain-experts eval`: a table of bits per character and perplexity per route (or JSON)."""
    from .evaluation import evaluation_report, format_report, load_model, read_data_specs
    from .files import write_file_atomically

    data = read_data_specs(args.data, args.text_column, args.max_samples)
    model = load_model(args.model)
    reference = load_model(args.reference) if args.reference else None
    report = evaluation_report(model, data, args.routing, reference, max_length=args.max_length)
    text = json.dumps(report, indent=2)
    print(text if args.json else format_report(report))
    if args.output:
        write_file_atomically(args.output, text + "\n")


def train_gate_command(args: argparse.Namespace) -> None:
    """`domain-experts train-gate`: train the gate entries of the domains given samples, save the model."""
    from pathlib import Path

    from .evaluation import load_model, read_data_specs
    from .files import check_replaceable, write_folder_atomically
    from .gate import train_gate

    check_replaceable(Path(args.output_dir), ("config.json",), overwrite=args.overwrite)  # before any work
    data = read_data_specs(args.data, args.text_column, args.max_samples)
    model = load_model(args.model)
    result = train_gate(model, data, threshold=args.threshold)
    write_folder_atomically(args.output_dir, model.save_pretrained, replaceable="config.json", overwrite=args.overwrite)
    print(json.dumps(result, indent=2))


def train_command(args: argparse.Namespace) -> None:
    from .train import train

    train(training_config_from_arguments(args))


def add_training_commands(commands) -> None:
    """`domain-experts train`, `train-gate` and `eval`."""
    train_parser = _add_parser(
        commands, "train", "train a domain on a frozen backbone, or pretrain a small backbone (Accelerate)",
        description="Train one domain's parameters with the backbone frozen (or pretrain a small backbone from "
        "scratch) in one Accelerate loop: the same flags run under `python` and `accelerate launch`.",
        epilog=TRAIN_EXAMPLES)
    add_training_arguments(train_parser)
    train_parser.set_defaults(run=train_command)

    gate_parser = _add_parser(commands, "train-gate", "train the gate that routes rows without a control token",
                              epilog=GATE_EXAMPLES)
    gate_parser.add_argument("model", type=_location, help="a saved DomainExperts model (folder or Hub repo)")
    _data_options(gate_parser, "samples")
    gate_parser.add_argument("--threshold", type=float, default=0.5,
                             help="route a row to the best domain only if its gate probability is at least this, "
                                  "else to the bare backbone (default: 0.5)")
    gate_parser.add_argument("--output-dir", required=True, help="the folder to save the model with its gate in")
    gate_parser.add_argument("--overwrite", action="store_true",
                             help="replace a model already saved in --output-dir (a folder of anything else is never "
                                  "replaced)")
    gate_parser.set_defaults(run=train_gate_command)

    eval_parser = _add_parser(commands, "eval", "perplexity, bits per character, forgetting, gate accuracy",
                              epilog=EVAL_EXAMPLES)
    eval_parser.add_argument("model", type=_location,
                             help="a saved DomainExperts model, or a backbone (Hub id, folder, or 'smollm2')")
    _data_options(eval_parser, "texts")
    eval_parser.add_argument("--routing", choices=["token", "gate", "both"], default="token",
                             help="reach each domain by its control token, by the learned gate (plain text), or "
                                  "both (default: token)")
    eval_parser.add_argument("--reference", type=_location,
                             help="also report forgetting: bits per character against this model (e.g. the backbone)")
    eval_parser.add_argument("--max-length", type=_at_least(2), default=512,
                             help="cut texts to this many tokens (default: 512)")
    eval_parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    eval_parser.add_argument("--output", help="also write the report to this JSON file")
    eval_parser.set_defaults(run=evaluate_command)


def build_parser() -> argparse.ArgumentParser:
    """The `domain-experts` parser with every command."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="domain-experts", description="Domain experts over a frozen backbone: train "
                                     "domains, route between them, ship them as packs.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('domain_experts')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    info_parser = _add_parser(commands, "info", "what a saved model or a domain pack holds", epilog="""\
examples:
  domain-experts info runs/recipes/model
  domain-experts info alice/recipes --revision v1 --json
""")
    info_parser.add_argument("path", type=_location, help="a model or pack folder, or a Hub repo id")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    info_parser.add_argument("--revision", help="with a Hub repo id: a branch or commit")
    _hub_options(info_parser)
    info_parser.set_defaults(run=info)
    add_training_commands(commands)
    add_augment_command(commands)
    add_pack_commands(commands)
    add_serve_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"domain-experts {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
