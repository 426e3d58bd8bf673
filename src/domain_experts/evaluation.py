"""Evaluation of a DomainExperts model: per-domain perplexity and bits per character, forgetting, gate accuracy.

The metrics are `evaluate` modules shipped in this package (`domain_experts/metrics/`), loaded offline with
`evaluate.load(<module path>)`: `bits_per_character` (comparable across tokenizers) and `routing_accuracy`.

Routes: a domain name, or None for the bare backbone. How a row reaches its domain:
- "token": the domain's control token first, text tokenized by the domain's tokenizer;
- "gate": plain text tokenized by the model's tokenizer, no control token: the learned gate routes it.
"""

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .files import check_location, read_json_file, read_text_file
from .gate import padded_prompts


logger = logging.get_logger(__name__)

METRICS_DIR = Path(__file__).parent / "metrics"
NONE_ROUTE = "none"


def load_metric(name: str):
    """One of our `evaluate` modules (`bits_per_character`, `routing_accuracy`), loaded from the package."""
    import evaluate  # slow to import, and only needed here

    return evaluate.load(str(METRICS_DIR / name))


def route_label(domain: str | None, routing: str = "token") -> str:
    """How rows reach what measures them, in words: "recipes domain (control token)", "bare backbone", "gate"."""
    if routing == "gate":
        return "routed by the gate"
    return f"{domain} domain (control token)" if domain is not None else "bare backbone"


@torch.no_grad()
def prefixed_batch(rows: list[list[int]], prefix: int, pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows, each led by `prefix` (a control token, or BOS), right-padded with `pad` to one width.

    Returns:
        `input_ids` and `attention_mask`, both `(len(rows), 1 + longest row)`.
    """
    width = 1 + max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, : 1 + len(ids)] = torch.tensor([prefix, *ids])
        attention_mask[i, : 1 + len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def language_modeling(model, texts: list[str], domain: str | None = None, routing: str = "token",
                      batch_size: int = 8, max_length: int = 512, description: str | None = None) -> dict:
    """Perplexity and bits per character of `model` on `texts`, routed to `domain` by its token or by the gate.

    Every text token is predicted: a row starts with the domain's control token ("token" routing) or else with the
    tokenizer's BOS (EOS if it has none), which is never a target. Works for a DomainExpertsForCausalLM and for a plain
    causal LM given its tokenizer as a `tokenizer` attribute (then `domain` must be None). Texts longer than
    `max_length` tokens are cut, and only the characters of the part kept count. `description` labels the progress
    bar (default: the route, e.g. "recipes texts, recipes domain (control token)").
    """
    if routing not in ("token", "gate"):
        raise ValueError(f"routing must be 'token' or 'gate', got {routing!r}.")
    if not texts:
        raise ValueError("No texts to evaluate.")
    model.eval()
    is_domain_experts = hasattr(model, "domain_names")
    by_token = is_domain_experts and routing == "token" and domain is not None
    tokenizer = model.tokenizer.tokenizer_for(domain if by_token else None) if is_domain_experts else model.tokenizer
    prefix = model.control_token_id(domain) if by_token else (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    config = model.config.backbone_config if is_domain_experts else model.config
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    max_length = min(max_length, context) if context else max_length
    nll, tokens, characters, cut = [], [], [], 0
    if description is None:
        route = route_label(domain, routing) if is_domain_experts else "model"
        description = f"{domain or NONE_ROUTE} texts, {route}"
    for start in tqdm(range(0, len(texts), batch_size), desc=description, unit="batch", leave=False):
        chunk = texts[start : start + batch_size]
        rows = [tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in chunk]
        cut += sum(len(ids) > max_length - 1 for ids in rows)
        rows = [ids[: max_length - 1] for ids in rows]
        characters += [len(tokenizer.decode(ids)) for ids in rows]
        input_ids, attention_mask = prefixed_batch(rows, prefix, pad, model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                   ignore_index=-100)
        nll += losses.sum(dim=1).tolist()
        tokens += (targets != -100).sum(dim=1).tolist()
    if cut:
        logger.warning(f"{description}: {cut} of {len(texts)} texts are longer than {max_length - 1} tokens; only "
                       "their first tokens (and characters) are measured. Raise max_length (--max-length) to measure "
                       "them whole.")
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
        before = language_modeling(reference, texts, route if reference_has_route else None,
                                   description=f"{route or NONE_ROUTE} texts, reference model", **kwargs)[
            "bits_per_character"]
        report[route or NONE_ROUTE] = {"reference": before, "model": now, "change": now - before}
    return report


@torch.no_grad()
def gate_accuracy(model, data: dict[str | None, list[str]], batch_size: int = 16, max_length: int = 256) -> dict:
    """How often the gate routes plain texts of each route to it (`routing_accuracy` metric)."""
    predictions, references = [], []
    for route, texts in data.items():
        for start in tqdm(range(0, len(texts), batch_size), desc=f"{route or NONE_ROUTE} texts, gate routing",
                          unit="batch", leave=False):
            routes = model.route(*padded_prompts(model.tokenizer, texts[start : start + batch_size], max_length,
                                                 model.device))
            predictions += [model.domain_names[r] if r >= 0 else NONE_ROUTE for r in routes.tolist()]
            references += [route or NONE_ROUTE] * len(routes)
    return load_metric("routing_accuracy").compute(predictions=predictions, references=references)


def perplexity_from_bits(bits_per_character: float, characters_per_token: float) -> float:
    """Token perplexity implied by a bits-per-character figure (for comparing with per-token reports)."""
    return math.pow(2, bits_per_character * characters_per_token)


def load_model(spec: str, **from_pretrained_kwargs):
    """A DomainExperts model (a saved folder or Hub repo), or a backbone (an id, a folder, or "smollm2") wrapped with
    no domain. `from_pretrained_kwargs` (`revision`, `token`, ...) go to the `from_pretrained` that loads it."""
    from transformers import AutoConfig

    from .modeling_domain_experts import DomainExpertsForCausalLM

    if spec == "smollm2":
        return DomainExpertsForCausalLM.from_backbone(spec)
    check_location(spec)
    config_file = Path(spec) / "config.json"
    if config_file.is_file():
        model_type = read_json_file(config_file, "model config", "save the model again.").get("model_type")
    elif Path(spec).is_dir():
        model_type = None  # `from_backbone` says what the folder lacks
    else:
        model_type = AutoConfig.from_pretrained(spec, **from_pretrained_kwargs).model_type
    if model_type == "domain_experts":
        return DomainExpertsForCausalLM.from_pretrained(spec, **from_pretrained_kwargs)
    return DomainExpertsForCausalLM.from_backbone(spec, **from_pretrained_kwargs)


def read_data_specs(specs: list[str], text_column: str = "text", max_samples: int | None = None) -> dict:
    """`NAME=PATH[:COLUMN]` specs (NAME "none" for the bare backbone's kind of text) -> {route: texts}.

    Specs with the same NAME add up; `max_samples` caps each file. Files are read by `files.read_text_file`: a file
    that cannot be read is one clear error naming it.
    """
    data = {}
    for spec in specs:
        name, _, source = spec.partition("=")
        if not name or not source:
            raise ValueError(f"Data spec {spec!r} is not NAME=PATH[:COLUMN] (NAME: a domain, or 'none').")
        path, _, column = source.partition(":")
        column = column or text_column
        rows = read_text_file(path, column, role=f"--data file for {name!r}")
        texts = [t for t in rows[column] if t and t.strip()]
        if not texts:
            raise ValueError(f"The --data file for {name!r} {path} holds no text in column {column!r}.")
        if len(texts) < len(rows):
            logger.warning(f"The --data file for {name!r} {path} has {len(rows) - len(texts)} of {len(rows)} rows "
                           f"without text in column {column!r}: they are left out.")
        texts = texts[:max_samples]
        data.setdefault(None if name == NONE_ROUTE else name, []).extend(texts)  # a name may come from several files
    return data


def evaluation_report(model, data: dict[str | None, list[str]], routing: str = "token", reference=None,
                      max_length: int = 512) -> dict:
    """What `domain-experts eval` reports: bits per character and perplexity of each route's texts (by control token,
    by the gate, or both), gate accuracy when the model has a trained gate, and forgetting against `reference`.

    Returns:
        `{"token"|"gate": {route: language_modeling(...)}, "gate_accuracy": ..., "forgetting": ...}` (routes named as
        in `data`, "none" for None).
    """
    report = {}
    for mode in (["token", "gate"] if routing == "both" else [routing]):
        report[mode] = {(route or NONE_ROUTE): language_modeling(model, texts, route, mode, max_length=max_length)
                        for route, texts in data.items()}
    if any(settings.get("gate") for settings in model.config.domains.values()):
        report["gate_accuracy"] = gate_accuracy(model, data)
    if reference is not None:
        report["forgetting"] = forgetting_report(model, reference, data, max_length=max_length)
    return report


def format_report(report: dict) -> str:
    """`evaluation_report` as a table for people."""
    lines = [f"{'data':<16} {'route':<36} {'texts':>6} {'perplexity':>11} {'bits/char':>10}"]
    for mode in ("token", "gate"):
        for route, result in report.get(mode, {}).items():
            label = route_label(None if route == NONE_ROUTE else route, mode)
            lines.append(f"{route:<16} {label:<36} {result['num_texts']:>6} {result['perplexity']:>11.3f} "
                         f"{result['bits_per_character']:>10.4f}")
    if "gate_accuracy" in report:
        accuracy = report["gate_accuracy"]
        per_route = ", ".join(f"{route} {value:.1%}" for route, value in accuracy["per_route"].items())
        lines.append(f"\ngate routing accuracy: {accuracy['accuracy']:.1%} ({per_route})")
    if "forgetting" in report:
        lines.append(f"\n{'data':<16} {'bits/char: reference':>21} {'model':>10} {'change':>10}")
        for route, change in report["forgetting"].items():
            lines.append(f"{route:<16} {change['reference']:>21.4f} {change['model']:>10.4f} "
                         f"{change['change']:>+10.4f}")
    return "\n".join(lines)
