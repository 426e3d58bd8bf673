"""Evaluation of a DomainExperts model: per-domain perplexity and bits per character, forgetting, gate accuracy.

The metrics are `evaluate` modules shipped in this package (`domain_experts/metrics/`), loaded offline with
`evaluate.load(<module path>)`: `bits_per_character` (comparable across tokenizers) and `routing_accuracy`.

Routes: a domain name, or None for the bare backbone. How a row reaches its domain:
- "token": the domain's control token first, text tokenized by the domain's tokenizer;
- "gate": plain text tokenized by the model's tokenizer, no control token: the learned gate routes it.
"""

import math
from pathlib import Path

import evaluate
import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

METRICS_DIR = Path(__file__).parent / "metrics"
NONE_ROUTE = "none"


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of our `evaluate` modules (`bits_per_character`, `routing_accuracy`), loaded from the package."""
    return evaluate.load(str(METRICS_DIR / name))


@torch.no_grad()
def language_modeling(model, texts: list[str], domain: str | None = None, routing: str = "token",
                      batch_size: int = 8, max_length: int = 512) -> dict:
    """Perplexity and bits per character of `model` on `texts`, routed to `domain` by its token or by the gate.

    Every text token is predicted: a row starts with the domain's control token ("token" routing) or else with the
    tokenizer's BOS (EOS if it has none), which is never a target. Works for a DomainExpertsForCausalLM and for a plain
    causal LM given its tokenizer as a `tokenizer` attribute (then `domain` must be None). Texts longer than
    `max_length` tokens are cut, and only the characters of the part kept count.
    """
    if routing not in ("token", "gate"):
        raise ValueError(f"routing must be 'token' or 'gate', got {routing!r}.")
    if not texts:
        raise ValueError("No texts to evaluate.")
    model.eval()
    is_domain_experts = hasattr(model, "tokenize")
    by_token = is_domain_experts and routing == "token" and domain is not None
    tokenizer = model.tokenizer_for(domain if by_token else None) if is_domain_experts else model.tokenizer
    prefix = model.control_token_id(domain) if by_token else (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    config = model.config.backbone_config if is_domain_experts else model.config
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    max_length = min(max_length, context) if context else max_length
    nll, tokens, characters = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"Evaluating {domain or NONE_ROUTE}", leave=False):
        chunk = texts[start : start + batch_size]
        rows = [tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"][: max_length - 1]
                for t in chunk]
        characters += [len(tokenizer.decode(ids)) for ids in rows]
        width = 1 + max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, : 1 + len(ids)] = torch.tensor([prefix, *ids])
            attention_mask[i, : 1 + len(ids)] = 1
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                   ignore_index=-100)
        nll += losses.sum(dim=1).tolist()
        tokens += (targets != -100).sum(dim=1).tolist()
    return load_metric("bits_per_character").compute(
        negative_log_likelihoods=nll, num_tokens=tokens, num_characters=characters)


def forgetting_report(model, reference, data: dict[str | None, list[str]], **kwargs) -> dict:
    """For each domain (and None: the bare backbone's own kind of text), bits per character now and in `reference`.

    A route the reference does not have (a domain added since) is measured there as plain text on its backbone.

    Returns:
        `{route: {"reference": bpc, "model": bpc, "change": model - reference}}`, routes named as in `data` ("none" for
        None). A positive change is forgetting (or, for a domain, a loss against the bare backbone).
    """
    report = {}
    for route, texts in data.items():
        now = language_modeling(model, texts, route, **kwargs)["bits_per_character"]
        reference_has_route = route is None or route in getattr(reference, "domains", {})
        before = language_modeling(reference, texts, route if reference_has_route else None, **kwargs)["bits_per_character"]
        report[route or NONE_ROUTE] = {"reference": before, "model": now, "change": now - before}
    return report


@torch.no_grad()
def gate_accuracy(model, data: dict[str | None, list[str]], batch_size: int = 16, max_length: int = 256) -> dict:
    """How often the gate routes plain texts of each route to it (`routing_accuracy` metric)."""
    predictions, references = [], []
    for route, texts in data.items():
        for start in range(0, len(texts), batch_size):
            batch = model.tokenize(texts[start : start + batch_size], truncation=True, max_length=max_length)
            routes = model.route(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
            predictions += [model.domain_names[r] if r >= 0 else NONE_ROUTE for r in routes.tolist()]
            references += [route or NONE_ROUTE] * len(routes)
    return load_metric("routing_accuracy").compute(predictions=predictions, references=references)


def perplexity_from_bits(bits_per_character: float, characters_per_token: float) -> float:
    """Token perplexity implied by a bits-per-character figure (for comparing with per-token reports)."""
    return math.pow(2, bits_per_character * characters_per_token)


def load_model(spec: str):
    """A DomainExperts model from a saved folder, or a backbone (an id, a path, or "smollm2") wrapped with no domain."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling_domain_experts import DomainExpertsForCausalLM

    config_file = Path(spec) / "config.json"
    if config_file.is_file() and '"domain_experts"' in config_file.read_text():
        return DomainExpertsForCausalLM.from_pretrained(spec)
    if spec == "smollm2":
        from .smollm2 import load_smollm2

        backbone, tokenizer = load_smollm2()
    else:
        backbone, tokenizer = AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
    return DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)


def read_data_specs(specs: list[str], text_column: str = "text", max_samples: int | None = None) -> dict:
    """`NAME=PATH[:COLUMN]` specs (NAME "none" for the bare backbone's kind of text) -> {route: texts}.

    Specs with the same NAME add up; `max_samples` caps each file.
    """
    import datasets

    data = {}
    for spec in specs:
        name, _, source = spec.partition("=")
        if not name or not source:
            raise ValueError(f"Data spec {spec!r} is not NAME=PATH[:COLUMN].")
        path, _, column = source.partition(":")
        column = column or text_column
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(
            Path(path).suffix)
        if builder is None or not Path(path).is_file():
            raise FileNotFoundError(f"Cannot read {path}: it must be an existing json, jsonl, csv, parquet or txt file.")
        rows = datasets.load_dataset(builder, data_files=path)["train"]
        if column not in rows.column_names:
            raise ValueError(f"{path} has no column {column!r}; its columns are {rows.column_names}.")
        texts = [t for t in rows[column] if t and t.strip()][:max_samples]
        if not texts:
            raise ValueError(f"{path} holds no text in column {column!r}.")
        data.setdefault(None if name == NONE_ROUTE else name, []).extend(texts)  # a name may come from several files
    return data


def add_eval_commands(commands) -> None:
    """Register `domain-experts eval` and `domain-experts train-gate`."""
    evaluate_parser = commands.add_parser("eval", help="perplexity, bits per character, forgetting, gate accuracy")
    evaluate_parser.add_argument("model", help="a saved DomainExperts model (or a backbone: id, path, 'smollm2')")
    evaluate_parser.add_argument("--data", action="append", required=True, metavar="NAME=PATH[:COLUMN]",
                                 help="texts of a domain, or of 'none' (the bare backbone); repeatable")
    evaluate_parser.add_argument("--text-column", default="text")
    evaluate_parser.add_argument("--routing", choices=["token", "gate", "both"], default="token")
    evaluate_parser.add_argument("--reference", help="a model to report forgetting against (e.g. the backbone)")
    evaluate_parser.add_argument("--max-samples", type=int, help="first N texts of each file")
    evaluate_parser.add_argument("--max-length", type=int, default=512)
    evaluate_parser.add_argument("--output", help="also write the report here as JSON")
    evaluate_parser.set_defaults(run=_evaluate_from_cli)

    gate_parser = commands.add_parser("train-gate", help="train the gate that routes rows without a control token")
    gate_parser.add_argument("model", help="a saved DomainExperts model")
    gate_parser.add_argument("--data", action="append", required=True, metavar="NAME=PATH[:COLUMN]",
                             help="samples of a domain, or of 'none' (the backbone's own kind of text); repeatable")
    gate_parser.add_argument("--text-column", default="text")
    gate_parser.add_argument("--threshold", type=float, default=0.5)
    gate_parser.add_argument("--max-samples", type=int, help="first N texts of each file")
    gate_parser.add_argument("--output-dir", required=True, help="where the model with its gate is saved")
    gate_parser.set_defaults(run=_train_gate_from_cli)


def _evaluate_from_cli(args) -> None:
    import json

    data = read_data_specs(args.data, args.text_column, args.max_samples)
    model = load_model(args.model)
    report = {}
    for routing in (["token", "gate"] if args.routing == "both" else [args.routing]):
        report[routing] = {(route or NONE_ROUTE): language_modeling(model, texts, route, routing, max_length=args.max_length)
                           for route, texts in data.items()}
    if any(settings.get("gate") for settings in model.config.domains.values()):
        report["gate_accuracy"] = gate_accuracy(model, data)
    if args.reference:
        report["forgetting"] = forgetting_report(model, load_model(args.reference), data, max_length=args.max_length)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


def _train_gate_from_cli(args) -> None:
    import json
    import os
    import shutil

    from .gate import train_gate

    data = read_data_specs(args.data, args.text_column, args.max_samples)
    model = load_model(args.model)
    result = train_gate(model, data, threshold=args.threshold)
    output_dir = Path(args.output_dir)
    partial = output_dir.with_name(f".partial-{output_dir.name}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(partial, output_dir)
    print(json.dumps(result, indent=2))
