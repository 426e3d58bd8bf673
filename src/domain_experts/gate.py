"""Training the learned gate: which domain, if any, a row without a control token belongs to.

The gate reads the mean hidden state of a prompt after the backbone's `config.gate_layer` (frozen, shared by all
domains) and gives each domain a logistic score, trained one-vs-rest on samples of every domain and of the backbone's
own kind of text (the "none" class). Features are standardised while training and the standardisation is folded back
into each domain's weights, so a domain's gate entry is self-contained and travels with its pack.
"""

import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)


def padded_prompts(tokenizer, texts: list[str], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain texts as `input_ids` and `attention_mask` (`torch.LongTensor`s of shape `(len(texts), longest)`), cut to
    `max_length` tokens and padded on the tokenizer's padding side with its pad token, or its EOS where it has none
    (Llama 3's and GPT-2's tokenizers have none): padded positions are masked out, so the id never matters."""
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        place = slice(longest - len(row), longest) if tokenizer.padding_side == "left" else slice(0, len(row))
        input_ids[index, place] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, place] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def prompt_features(model, texts: list[str], batch_size: int = 16, max_length: int = 256,
                    description: str = "gate features") -> torch.Tensor:
    """Gate features `(len(texts), hidden_size)` of plain texts, as `model.route` computes them (`description` labels
    the progress bar)."""
    features = []
    for start in tqdm(range(0, len(texts), batch_size), desc=description, unit="batch", leave=False):
        input_ids, attention_mask = padded_prompts(model.tokenizer, texts[start : start + batch_size], max_length,
                                                   model.device)
        features.append(model.gate_features(input_ids, attention_mask).cpu())
    return torch.cat(features)


def train_gate(
    model,
    samples: dict[str | None, list[str]],
    threshold: float = 0.5,
    l2: float = 1e-3,
    max_iterations: int = 200,
    batch_size: int = 16,
    max_length: int = 256,
) -> dict:
    """Train the gate entries of the domains in `samples` (texts by domain name; None for the "none" class).

    Domains not in `samples` keep their gate entry as it is. Sets `model.config.gate_threshold`.

    Returns:
        `{"train_accuracy": float, "num_samples": int}`, the accuracy of routing the training samples.
    """
    domains = [name for name in samples if name is not None]
    for name in domains:
        if name not in model.domain_names:
            raise KeyError(f"Unknown domain {name!r}; the model has: {', '.join(model.domain_names) or 'none'}.")
    if not domains:
        raise ValueError("The gate needs samples of at least one domain.")
    if any(not texts for texts in samples.values()):
        empty = [name or "none" for name, texts in samples.items() if not texts]
        raise ValueError(f"No samples for: {', '.join(empty)}.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}.")

    features = torch.cat([
        prompt_features(model, texts, batch_size, max_length, f"{name or 'none'} texts, gate features")
        for name, texts in samples.items()
    ])
    labels = torch.cat([torch.full((len(texts),), domains.index(name) if name is not None else -1)
                        for name, texts in samples.items()])
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    standardized = (features - mean) / std
    targets = torch.stack([(labels == d).float() for d in range(len(domains))], dim=1)

    weight = torch.zeros(len(domains), features.shape[1], requires_grad=True)
    bias = torch.zeros(len(domains), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = standardized @ weight.T + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        folded_weight = weight / std
        folded_bias = bias - folded_weight @ mean
        for index, name in enumerate(domains):
            entry = model.domains[name]
            entry.gate_weight.copy_(folded_weight[index].to(entry.gate_weight))
            entry.gate_bias.copy_(folded_bias[index : index + 1].to(entry.gate_bias))
            model.config.domains[name]["gate"] = True
        model.config.gate_threshold = threshold
        probabilities = torch.sigmoid(standardized @ weight.T + bias)
        best, best_domain = probabilities.max(dim=1)
        predicted = torch.where(best >= threshold, best_domain, -1)
    accuracy = (predicted == labels).float().mean().item()
    logger.info(f"Gate trained on {len(labels)} samples: training accuracy {accuracy:.4f}.")
    return {"train_accuracy": accuracy, "num_samples": len(labels)}
