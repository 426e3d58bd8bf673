"""The `domain-experts` command line."""

import argparse
import json
import os
import sys

from transformers.utils import logging

from .augment import add_augment_command
from .evaluation import add_eval_commands
from .train import add_train_command


logger = logging.get_logger(__name__)


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
          f"{manifest.control_token}, {len(manifest.tokens)} tokens of its own, gate "
          f"{'trained' if manifest.gate_trained else 'not trained'}, {manifest.num_parameters:,} parameters")
    if manifest.evaluation:
        print("evaluation: " + ", ".join(f"{k} {v}" for k, v in manifest.evaluation["metrics"].items()))


def _hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN or the saved login)")


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


def parse_pack_spec(spec: str) -> dict:
    """`[NAME=]SOURCE[@REVISION]` -> `load_domain` arguments; an existing folder is taken as it is."""
    if os.path.isdir(spec):
        return {"repo_id_or_path": spec}
    name, separator, rest = spec.partition("=")
    if not separator or "/" in name:
        name, rest = None, spec
    source, separator, revision = rest.partition("@")
    entry = {"repo_id_or_path": source}
    if separator:
        entry["revision"] = revision
    if name:
        entry["name"] = name
    return entry


def compose(args: argparse.Namespace) -> None:
    """Load packs onto a backbone and save the composed model (and/or push it)."""
    from .modeling_domain_experts import DomainExpertsForCausalLM
    from .packs import write_folder_atomically, write_model_card

    if not args.output and not args.push_to:
        raise ValueError("Say where the composed model goes: --output DIR and/or --push-to REPO_ID.")
    packs = [{**parse_pack_spec(spec), "token": args.token} for spec in args.packs]
    backbone_kwargs = {key: value for key, value in (("revision", args.backbone_revision), ("token", args.token)) if value}
    model = DomainExpertsForCausalLM.from_backbone(args.backbone, domains=packs, **backbone_kwargs)
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
    push_parser = commands.add_parser("push", help="push a domain pack to the Hub")
    push_parser.add_argument("source", help="a pack folder, or a saved model folder with --domain")
    push_parser.add_argument("repo_id", help="the Hub repo to push to (created if needed)")
    push_parser.add_argument("--domain", help="the domain of the saved model to push")
    push_parser.add_argument("--private", action="store_true", help="create the repo private")
    push_parser.add_argument("--revision", help="the branch to push to (default: main)")
    push_parser.add_argument("--commit-message")
    push_parser.add_argument("--dataset", action="append", help="a dataset the domain was trained on (repeatable)")
    push_parser.add_argument("--evaluation", help='a JSON file: {"dataset": ..., "split": ..., "metrics": {...}}')
    push_parser.add_argument("--license", help="a license id for the model card")
    _hub_options(push_parser)
    push_parser.set_defaults(run=push)

    pull_parser = commands.add_parser("pull", help="download a domain pack from the Hub into a folder")
    pull_parser.add_argument("repo_id")
    pull_parser.add_argument("output", help="the pack folder to write")
    pull_parser.add_argument("--revision", help="a branch or commit (default: main)")
    _hub_options(pull_parser)
    pull_parser.set_defaults(run=pull)

    compose_parser = commands.add_parser("compose", help="load domain packs onto a backbone into one model")
    compose_parser.add_argument("backbone", help="the backbone: a Hub model id or a local folder")
    compose_parser.add_argument("packs", nargs="+", metavar="PACK",
                                help="[NAME=]REPO_ID_OR_FOLDER[@REVISION]: NAME= loads the pack under another name")
    compose_parser.add_argument("--output", help="save the composed model (with remote code and card) here")
    compose_parser.add_argument("--push-to", metavar="REPO_ID", help="push the composed model to this Hub repo")
    compose_parser.add_argument("--private", action="store_true", help="with --push-to: create the repo private")
    compose_parser.add_argument("--backbone-revision", help="a branch or commit of the backbone repo")
    _hub_options(compose_parser)
    compose_parser.set_defaults(run=compose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="domain-experts", description="Domain experts over a frozen backbone.")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="what a saved model or a domain pack holds")
    info_parser.add_argument("path", help="a model or pack folder, or a Hub repo id")
    info_parser.add_argument("--json", action="store_true", help="print JSON")
    info_parser.add_argument("--revision", help="with a Hub repo id: a branch or commit")
    _hub_options(info_parser)
    info_parser.set_defaults(run=info)
    add_pack_commands(commands)
    add_augment_command(commands)
    add_train_command(commands)
    add_eval_commands(commands)
    args, extra_arguments = parser.parse_known_args(argv)
    if extra_arguments and not getattr(args, "takes_extra_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra_arguments)}")
    args.extra_arguments = extra_arguments
    try:
        args.run(args)
    except (OSError, ValueError, KeyError) as error:
        print(f"domain-experts {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
