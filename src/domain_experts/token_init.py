"""Tokens of a domain's own that start where the backbone is, and the choice of how many to add.

A domain's token joins a run of backbone tokens, its *pieces*. `add_domain` starts its input row at the mean of its
pieces' input rows and its output row at the mean of their output rows. On a pretrained backbone that start is far from
what the backbone knows: SmolLM2-135M with 4,000 tokens learned from recipes reads recipes at +29% bits per character
before any training. `initialize_domain_tokens` starts the new rows from the backbone's own behaviour instead, using the
domain's training texts only:

1. **Input rows** by Token Distillation (Dobler et al., 2025, "AweDist"): gradient steps on the new input rows alone, so
   that the frozen model's final hidden states on a text in the domain's tokenization match those on the same text in
   the backbone's tokenization, at every position where both tokenizations end a token at the same character.
2. **Output rows and biases** by maximum likelihood on the domain's tokenization of the texts, the hidden states fixed
   (so the problem is convex; L-BFGS): each new token's output row and bias, and the domain's `logit_bias` on the
   backbone tokens that new tokens start with (in the domain's rows those are rarer: their text is now read in longer
   pieces). The start, and the centre of a Gaussian prior that keeps rarely seen tokens there, is the chain rule: a new
   token's row is its first piece's, its bias the backbone's log-probability of its other pieces after the first.

`add_domain_with_tokens` adds a domain with tokens of its own only if that pays off before training: it tries each
number of new tokens it is given, initialises them as above, and keeps the one with the lowest bits per character on
the validation texts, provided it is within `tolerance` of the same domain without new tokens; otherwise the domain
keeps the backbone's tokenizer, and a warning says so. What was tried and chosen is recorded in the domain's config
entry (`"token_init"`), and so in its packs.
"""

import copy
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .evaluation import language_modeling, prefixed_batch
from .tokenization_domain_experts import backbone_pieces, extend_tokenizer


logger = logging.get_logger(__name__)


@dataclass
class TokenInitConfig:
    """How `initialize_domain_tokens` starts a domain's new tokens.

    Args:
        distill_steps: Token Distillation steps on the input rows (0: keep the mean of the pieces). Each is a forward
            and backward pass of the whole model over `distill_batch_tokens` tokens: minutes on a CPU.
        distill_learning_rate: AdamW learning rate of those steps.
        distill_length: the texts are cut into pieces of this many domain tokens for distillation (a token's input
            row is learned from its neighbourhood; short rows make a step cheap).
        distill_batch_tokens: padded tokens per distillation step.
        fit_iterations: L-BFGS iterations of the output-row fit (0: keep `add_domain`'s output rows).
        prior_strength: weight of the Gaussian prior of the fit around the chain-rule start, in texts' positions.
        max_texts: training texts used (the first ones).
        max_length: domain tokens kept per text.
        batch_tokens: padded tokens per forward pass.
        seed: order of the distillation batches.
    """

    distill_steps: int = 60
    distill_learning_rate: float = 1e-2
    distill_length: int = 64
    distill_batch_tokens: int = 1024
    fit_iterations: int = 30
    prior_strength: float = 30.0
    max_texts: int = 200
    max_length: int = 256
    batch_tokens: int = 2048
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _AlignedText:
    """One text in both tokenizations, and the positions (in rows that start with the control token) where both end a
    token at the same character."""

    domain_ids: list[int]
    backbone_ids: list[int]
    domain_positions: list[int]
    backbone_positions: list[int]


def _aligned_texts(model, name: str, texts: list[str], max_length: int, whole: bool = False) -> list[_AlignedText]:
    """Each text's first `max_length - 1` domain tokens or, `whole`, all of it in pieces of that many."""
    own, base = model.tokenizer.tokenizer_for(name), model.tokenizer.tokenizer_for(None)
    encode = dict(add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    spans = []
    for text in texts:
        offsets = own(text, **encode)["offset_mapping"]
        if not offsets:
            continue
        for start in range(0, len(offsets), max_length - 1) if whole else [0]:
            piece = offsets[start : start + max_length - 1]
            spans.append(text[piece[0][0] : piece[-1][1]])
    aligned = []
    for text in spans:
        domain = own(text, **encode)
        ids, offsets = domain["input_ids"][: max_length - 1], domain["offset_mapping"][: max_length - 1]
        if not ids:
            continue
        backbone = base(text[: offsets[-1][1]], **encode)
        backbone_end = {end: k for k, (_, end) in enumerate(backbone["offset_mapping"])}
        pairs = [(0, 0)] + [(j + 1, backbone_end[end] + 1) for j, (_, end) in enumerate(offsets) if end in backbone_end]
        aligned.append(_AlignedText(ids, backbone["input_ids"], [j for j, _ in pairs], [k for _, k in pairs]))
    return aligned


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that each padded batch holds at most `batch_tokens` tokens (or one row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for index in order:
        if current and (len(current) + 1) * (lengths[index] + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


def _domain_forward(model, name: str, rows: list[list[int]], **kwargs):
    """The domain's route over `rows` (each led by the control token), right-padded."""
    control = model.control_token_id(name)
    input_ids, attention_mask = prefixed_batch(rows, control, control, model.device)
    domain_ids = torch.full((len(rows),), model.domain_names.index(name), device=model.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, domain_ids=domain_ids, use_cache=False,
                   output_hidden_states=True, **kwargs)


def distill_input_rows(model, name: str, texts: list[str], config: TokenInitConfig) -> list[float]:
    """Token Distillation of domain `name`'s new input rows (the control token's row stays). Returns the losses."""
    domain = model.domains[name]
    aligned = _aligned_texts(model, name, texts, config.distill_length, whole=True)
    aligned = [a for a in aligned if any(t >= model.config.domains[name]["token_ids"][1] for t in a.domain_ids)]
    batches = _batches([len(a.domain_ids) for a in aligned], config.distill_batch_tokens)
    if not batches:
        return []
    teacher = {}
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"Token init ({name}): backbone states to distil", unit="batch", leave=False):
            output = _domain_forward(model, name, [aligned[i].backbone_ids for i in batch], logits_to_keep=1)
            for row, i in enumerate(batch):
                teacher[i] = output.hidden_states[-1][row, aligned[i].backbone_positions]
    trainable = {p: p.requires_grad for p in domain.parameters()}
    domain.requires_grad_(False)
    domain.token_embeddings.requires_grad_(True)
    optimizer = torch.optim.AdamW([domain.token_embeddings], lr=config.distill_learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    order, losses = [], []
    try:
        progress = tqdm(range(config.distill_steps), desc=f"Token init ({name}): distilling input rows", unit="step",
                        leave=False)
        for _ in progress:
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            batch = batches[order.pop()]
            output = _domain_forward(model, name, [aligned[i].domain_ids for i in batch], logits_to_keep=1)
            student = torch.cat([output.hidden_states[-1][row, aligned[i].domain_positions]
                                 for row, i in enumerate(batch)])
            loss = torch.nn.functional.mse_loss(student, torch.cat([teacher[i] for i in batch]))
            loss.backward()
            domain.token_embeddings.grad[0] = 0.0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
    return losses


@torch.no_grad()
def _chain_rule_bias(model, name: str, pieces: list[list[int]], batch_tokens: int) -> torch.Tensor:
    """`(N,)`: log P(pieces 2.. | control token, first piece) under the domain's route (still the backbone's)."""
    backbone_vocab_size = model.config.backbone_vocab_size
    bias = torch.zeros(len(pieces))
    for batch in _batches([len(p) for p in pieces], batch_tokens):
        output = _domain_forward(model, name, [pieces[i] for i in batch])
        log_probs = output.logits[:, :-1, :backbone_vocab_size].float().log_softmax(-1)
        for row, i in enumerate(batch):
            targets = torch.tensor(pieces[i][1:], device=log_probs.device)
            bias[i] = log_probs[row, 1 : len(pieces[i])].gather(1, targets[:, None]).sum().cpu()
    return bias


@torch.no_grad()
def _fit_positions(model, name: str, aligned: list[_AlignedText], first_pieces: torch.Tensor, batch_tokens: int,
                   mass_threshold: float = 1e-4) -> dict:
    """What the output fit needs of every position of the domain's rows that predicts a text token: the final hidden
    state, the log-sum-exp of the backbone logits of the tokens that start no new token, the target's class.

    Positions where the first pieces hold less than `mass_threshold` of the backbone's probability and the target is
    no new token are left out: the new tokens' logits start at their first pieces', so they barely move there.
    """
    backbone_vocab_size = model.config.backbone_vocab_size
    first_id = model.config.domains[name]["token_ids"][1]
    is_first = torch.zeros(backbone_vocab_size, dtype=torch.bool, device=model.device)
    is_first[first_pieces] = True
    slot = torch.full((backbone_vocab_size,), -1, dtype=torch.long, device=model.device)
    slot[first_pieces] = torch.arange(len(first_pieces), device=model.device)
    kept = {"states": [], "rest": [], "target_logit": [], "new_target": [], "first_target": []}
    total = 0
    for batch in tqdm(_batches([len(a.domain_ids) for a in aligned], batch_tokens),
                      desc=f"Token init ({name}): hidden states to fit output rows", unit="batch", leave=False):
        output = _domain_forward(model, name, [aligned[i].domain_ids for i in batch])
        for row, i in enumerate(batch):
            targets = torch.tensor(aligned[i].domain_ids, device=model.device)
            count = len(targets)
            total += count
            logits = output.logits[row, :count, :backbone_vocab_size].float()
            log_normaliser = logits.logsumexp(-1)
            first_logits = logits.masked_fill(~is_first, float("-inf"))
            first_mass = (first_logits.logsumexp(-1) - log_normaliser).exp()
            is_new = targets >= first_id
            keep = (first_mass > mass_threshold) | is_new
            rest = logits.masked_fill(is_first, float("-inf")).logsumexp(-1)
            backbone_target = targets.clamp(max=backbone_vocab_size - 1)
            kept["states"].append(output.hidden_states[-1][row, :count].float()[keep])
            kept["rest"].append(rest[keep])
            kept["target_logit"].append(logits.gather(1, backbone_target[:, None])[:, 0][keep])
            kept["new_target"].append(torch.where(is_new, targets - first_id, -1)[keep])
            kept["first_target"].append(torch.where(is_new, -1, slot[backbone_target])[keep])
    return {key: torch.cat(values) for key, values in kept.items()} | {"total": total}


def fit_output_rows(model, name: str, aligned: list[_AlignedText], config: TokenInitConfig) -> dict:
    """Maximum a posteriori output rows, output biases and first-piece `logit_bias` of domain `name`'s new tokens
    (see the module docstring); writes them into the domain. Returns what the fit saw."""
    domain = model.domains[name]
    backbone_tokenizer = model.tokenizer.tokenizer_for(None)
    new_tokens = model.config.domains[name]["tokens"][1:]
    pieces = [backbone_pieces(backbone_tokenizer, token) for token in new_tokens]
    head = model.backbone.get_output_embeddings()
    head_weight = head.weight.detach().float()
    head_bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    first = torch.tensor([p[0] for p in pieces], device=model.device)
    first_pieces = torch.unique(first)
    start_rows = head_weight[first].clone()
    start_bias = _chain_rule_bias(model, name, pieces, config.batch_tokens).to(model.device)
    positions = _fit_positions(model, name, aligned, first_pieces, config.batch_tokens)
    process = model.architecture.logits_processing or (lambda logits, _: logits)
    backbone_config = model.config.backbone_config
    first_rows = head_weight[first_pieces]
    first_head_bias = head_bias[first_pieces] if head_bias is not None else 0.0

    rows = start_rows.clone().requires_grad_(True)
    bias = start_bias.clone().requires_grad_(True)
    correction = torch.zeros(len(first_pieces), device=model.device, requires_grad=True)
    count = max(positions["total"], 1)
    optimizer = torch.optim.LBFGS([rows, bias, correction], lr=1, max_iter=config.fit_iterations, history_size=20,
                                  line_search_fn="strong_wolfe")
    losses = []

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for start in range(0, len(positions["states"]), 4096):
            part = slice(start, start + 4096)
            states = positions["states"][part]
            new_logits = process(states @ rows.T + bias, backbone_config)
            first_logits = process(states @ first_rows.T + first_head_bias + correction, backbone_config)
            normaliser = torch.stack([positions["rest"][part], first_logits.logsumexp(-1), new_logits.logsumexp(-1)],
                                     -1).logsumexp(-1)
            new_target, first_target = positions["new_target"][part], positions["first_target"][part]
            target = torch.where(first_target >= 0, first_logits.gather(1, first_target.clamp(min=0)[:, None])[:, 0],
                                 positions["target_logit"][part])
            target = torch.where(new_target >= 0, new_logits.gather(1, new_target.clamp(min=0)[:, None])[:, 0], target)
            loss = (normaliser - target).double().sum() / count
            loss.backward()
            total += loss.item()
        prior = config.prior_strength / 2 / count * (
            ((rows - start_rows) ** 2).sum() + ((bias - start_bias) ** 2).sum() + (correction**2).sum())
        prior.backward()
        losses.append(total + prior.item())
        return total + prior.item()

    if config.fit_iterations:
        optimizer.step(closure)
    with torch.no_grad():
        domain.output_embeddings.copy_(rows.to(domain.output_embeddings.dtype))
        domain.output_bias.copy_(bias.to(domain.output_bias.dtype))
        domain.logit_bias.zero_()
        domain.logit_bias[first_pieces] = correction.to(domain.logit_bias.dtype)
    seen = int((positions["new_target"] >= 0).sum())
    return {"positions": positions["total"], "positions_fitted": len(positions["states"]),
            "new_token_occurrences": seen,
            "new_tokens_seen": int(torch.unique(positions["new_target"][positions["new_target"] >= 0]).numel()),
            "loss_bits_per_token": [value / math.log(2) for value in losses[:1] + losses[-1:]]}


def initialize_domain_tokens(model, name: str, texts: list[str], config: TokenInitConfig | None = None) -> dict:
    """Start domain `name`'s own tokens from the backbone's behaviour on `texts` (see the module docstring): distilled
    input rows, then fitted output rows and biases. For a domain just added with tokens of its own; the backbone and
    every other domain are untouched. Records and returns what was done (the domain's config entry `"token_init"`).
    """
    config = config or TokenInitConfig()
    model.check_domain(name)
    domain = model.domains[name]
    if domain.output_weight() is None:
        raise ValueError(f"Domain {name!r} has no tokens of its own to initialise.")
    if domain.output_embeddings is None or domain.output_bias is None or domain.logit_bias is None:
        raise ValueError(f"Domain {name!r} was saved by an older release (its tokens share their input and output "
                         "rows): only domains added by this release can be initialised this way.")
    aligned = _aligned_texts(model, name, texts[: config.max_texts], config.max_length)
    if not aligned:
        raise ValueError(f"No text to initialise domain {name!r}'s tokens from.")
    was_training = model.training
    model.eval()
    try:
        distill_losses = distill_input_rows(model, name, texts[: config.max_texts], config) if config.distill_steps else []
        fit = fit_output_rows(model, name, aligned, config)
    finally:
        model.train(was_training)
    record = {"method": ("distilled" if config.distill_steps else "mean of pieces") + " input rows, fitted output rows",
              "settings": config.to_dict(), "texts": len(aligned), "fit": fit,
              "distill_mse": distill_losses[:1] + distill_losses[-1:]}
    model.config.domains[name]["token_init"] = record
    return record


def same_characters(model, texts: list[str], max_length: int) -> list[str]:
    """Each text cut to the characters the backbone's first `max_length - 1` tokens cover.

    A domain's tokenization of a text is never longer than the backbone's (it only joins backbone tokens), so a
    measurement cut at `max_length` tokens reads exactly these characters with or without tokens of the domain's own;
    cut by tokens instead, it would read more of each long text with them, and compare other characters.
    """
    tokenizer = model.tokenizer.tokenizer_for(None)
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return [text[: offsets[max_length - 2][1]] if len(offsets) > max_length - 1 else text
            for text, offsets in zip(texts, encoded["offset_mapping"])]


def add_domain_with_tokens(model, name: str, texts: list[str], validation_texts: list[str],
                           num_new_tokens: int | list[int], init: TokenInitConfig | None = None,
                           tolerance: float = 0.01, **add_domain_kwargs) -> dict:
    """Add domain `name` with tokens of its own learned from `texts`, if they pay off before training.

    Each number in `num_new_tokens` is tried on a scratch copy of the domain that shares the backbone: tokens learned
    from `texts` (`extend_tokenizer`), started by `initialize_domain_tokens` (with `init`), then measured in bits per
    character on `validation_texts` (each cut to the same characters for every number, see `same_characters`) through
    the control token. The best is added to `model` if it is within `tolerance` (relative) of the same domain without
    tokens of its own; if none is, the domain is added without them and a warning says so. `add_domain_kwargs` go to
    `add_domain` (blocks, adapters).

    Returns:
        The record kept in `model.config.domains[name]["token_init"]`: the validation bits per character of each number
        tried and without new tokens, the number chosen (0: none) and, if any, how its rows were initialised.
    """
    if not validation_texts:
        raise ValueError("Choosing domain tokens needs validation texts (they decide, the training texts fit).")
    init = init or TokenInitConfig()
    candidates = sorted({num_new_tokens} if isinstance(num_new_tokens, int) else set(num_new_tokens))
    if not candidates or candidates[0] < 1:
        raise ValueError(f"num_new_tokens must be positive numbers, got {num_new_tokens}.")

    def scratch_model():
        config = copy.deepcopy(model.config)
        config.domains = {}
        return type(model)(config, backbone=model.backbone, tokenizer=model.tokenizer)

    validation_texts = same_characters(model, validation_texts, init.max_length)

    def validation_bpc(scratch) -> float:
        return language_modeling(scratch, validation_texts, name, max_length=init.max_length,
                                 description=f"Token init ({name}): validation texts")["bits_per_character"]

    without = scratch_model()
    without.add_domain(name, **add_domain_kwargs)
    tried = {"none": validation_bpc(without)}
    del without
    best = None
    for count in candidates:
        tokenizer = extend_tokenizer(model.tokenizer.backbone_tokenizer(), texts, count)
        scratch = scratch_model()
        scratch.add_domain(name, tokenizer=tokenizer, **add_domain_kwargs)
        record = initialize_domain_tokens(scratch, name, texts, init)
        learned = len(scratch.config.domains[name]["tokens"]) - 1
        tried[str(learned)] = bpc = validation_bpc(scratch)
        logger.info(f"Domain {name!r} with {learned} tokens of its own: validation bits per character {bpc:.4f} before "
                    f"training (without them: {tried['none']:.4f}).")
        if best is None or bpc < best[0]:
            best = (bpc, learned, tokenizer, scratch.domains[name].state_dict(), record)
        del scratch
    bpc, learned, tokenizer, state_dict, record = best
    summary = {"validation_bits_per_character": tried, "validation_texts": len(validation_texts),
               "tolerance": tolerance}
    if bpc <= tried["none"] * (1 + tolerance):
        model.add_domain(name, tokenizer=tokenizer, state_dict=state_dict, **add_domain_kwargs)
        model.config.domains[name]["token_init"] = {"new_tokens": learned, **summary, **record}
    else:
        logger.warning(
            f"Domain {name!r}: no number of tokens of its own tried ({', '.join(map(str, candidates))}) reads the "
            f"validation texts within {tolerance:.0%} of the backbone's tokenizer before training (best: {learned} "
            f"tokens, {bpc:.4f} against {tried['none']:.4f} bits per character), so the domain keeps the backbone's "
            "tokenizer. Fewer tokens, or more training texts to learn and fit them from, may do better.")
        model.add_domain(name, **add_domain_kwargs)
        model.config.domains[name]["token_init"] = {"new_tokens": 0, **summary}
    return model.config.domains[name]["token_init"]


__all__ = ["TokenInitConfig", "add_domain_with_tokens", "distill_input_rows", "fit_output_rows",
           "initialize_domain_tokens", "same_characters"]
