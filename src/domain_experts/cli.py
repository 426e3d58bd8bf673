"""The `domain-experts` command line."""

import argparse
import json
import sys

from transformers.utils import logging

from .augment import add_augment_command
from .evaluation import add_eval_commands
from .train import add_train_command


logger = logging.get_logger(__name__)


def info(args: argparse.Namespace) -> None:
    """Print what a saved DomainExperts model holds: backbone, domains, blocks, tokens, parameter counts."""
    from .configuration_domain_experts import DomainExpertsConfig

    config = DomainExpertsConfig.from_pretrained(args.path)
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
        print(f"domain {name}: {d['blocks']} blocks after layers {d['after_layers']}, "
              f"control token {d['control_token']} = {d['token_ids'][0]}, {len(d['token_ids'])} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="domain-experts", description="Domain experts over a frozen backbone.")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="what a saved model holds")
    info_parser.add_argument("path", help="a folder written by save_pretrained (or a Hub repo id)")
    info_parser.add_argument("--json", action="store_true", help="print JSON")
    info_parser.set_defaults(run=info)
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
