# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""Domain tokenizers: a backbone's BPE tokenizer extended with tokens learned from a domain's text.

This file is copied next to every saved model and loaded with `trust_remote_code=True`, so it imports only the standard
library and transformers, and must stay self-contained.

A domain tokenizer is a strict superset of its backbone's tokenizer: every backbone token keeps its id, and the new
tokens are merges of backbone tokens appended after all backbone merges. Because BPE applies merges in rank order and the
new merges rank last, a domain tokenizer first produces exactly the backbone's tokens, then joins some of them: decoding
is unchanged, and every new token stands for a known sequence of backbone tokens (which is where its embedding starts).
"""

import heapq
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend; domain tokenizers need a fast tokenizer.")
    data = json.loads(backend.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"Domain tokenizers extend BPE tokenizers; this tokenizer's model is {data['model']['type']}.")
    return data


def rebuild_tokenizer(tokenizer: PreTrainedTokenizerBase, data: dict, special_tokens: list[str] = ()) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` (same class, settings and special tokens) whose backend is the tokenizer JSON `data`."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False)
        # Special tokens listed in tokenizer_config.json are re-added on load: keep only those `data` still has.
        present = set(data["model"]["vocab"]) | {entry["content"] for entry in data["added_tokens"]}
        config_path = os.path.join(folder, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(config.get(key), list):
                config[key] = [t for t in config[key] if (t if isinstance(t, str) else t.get("content")) in present]
        with open(config_path, "w", encoding="utf-8") as file:
            json.dump(config, file, ensure_ascii=False)
        rebuilt = AutoTokenizer.from_pretrained(folder)
    if special_tokens:
        rebuilt.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in special_tokens]},
            replace_extra_special_tokens=False,
        )
    for setting in ("padding_side", "split_special_tokens"):  # settings the caller may have changed after loading
        setattr(rebuilt, setting, getattr(tokenizer, setting))
        rebuilt.init_kwargs[setting] = getattr(tokenizer, setting)  # saved with the tokenizer
    return rebuilt


def add_tokens_at_ids(
    tokenizer: PreTrainedTokenizerBase,
    tokens: dict[str, int],
    merges: list[tuple[str, str]] = (),
    special_tokens: list[str] = (),
) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` with `tokens` at exactly the given ids (BPE vocabulary entries) and `merges` ranked last.

    Tokens listed in `special_tokens` become special tokens at their id: matched whole in text (unless the tokenizer
    splits special tokens) and skipped by `decode(..., skip_special_tokens=True)`. Ids may leave gaps.
    """
    data = _tokenizer_json(tokenizer)
    vocab = data["model"]["vocab"]
    for token in tokens:
        vocab.pop(token, None)  # tokens already present move to their new id
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["content"] not in tokens]
    taken = {token_id: token for token, token_id in vocab.items()}
    taken.update({entry["id"]: entry["content"] for entry in data["added_tokens"]})
    for token, token_id in tokens.items():
        if token_id in taken:
            raise ValueError(f"Cannot put {token!r} at id {token_id}: the tokenizer already has {taken[token_id]!r} there.")
        vocab[token] = token_id
    existing = data["model"]["merges"]
    as_strings = bool(existing) and isinstance(existing[0], str)
    existing.extend(f"{a} {b}" if as_strings else [a, b] for a, b in merges)
    # An added token whose content is in the model vocabulary takes that id.
    return rebuild_tokenizer(tokenizer, data, list(special_tokens))


def new_tokens_of(domain_tokenizer: PreTrainedTokenizerBase, base_vocab: dict[str, int]) -> list[str]:
    """The tokens `domain_tokenizer` adds to the backbone vocabulary `base_vocab` (token -> id), in id order.

    Raises:
        ValueError: if `domain_tokenizer` is not a superset of `base_vocab` (some backbone token has another id or is
            missing): it was made for another backbone.
    """
    domain_vocab = domain_tokenizer.get_vocab()
    changed = [token for token, token_id in base_vocab.items() if domain_vocab.get(token) != token_id]
    if changed:
        raise ValueError(
            f"The domain tokenizer is not an extension of the backbone's tokenizer: {len(changed)} backbone tokens are "
            f"missing or have other ids (e.g. {changed[:3]}). Was it made for another backbone?"
        )
    special = set(domain_tokenizer.all_special_tokens)
    added = [(token_id, token) for token, token_id in domain_vocab.items() if token not in base_vocab and token not in special]
    return [token for _, token in sorted(added)]


def backbone_pieces(base_tokenizer: PreTrainedTokenizerBase, token: str) -> list[int]:
    """The ids of the backbone tokens that new token `token` joins (its backbone tokenization)."""
    return [piece.id for piece in base_tokenizer.backend_tokenizer.model.tokenize(token)]


def _words(tokenizer: PreTrainedTokenizerBase, corpus: Iterable[str]) -> Counter:
    """How often each pre-tokenized word of `corpus` occurs (words are what BPE merges never cross)."""
    backend = tokenizer.backend_tokenizer
    words = Counter()
    for text in corpus:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        words.update(word for word, _ in pieces)
    return words


def extend_tokenizer(
    base_tokenizer: PreTrainedTokenizerBase,
    corpus: Iterable[str],
    num_new_tokens: int,
    min_frequency: int = 2,
) -> PreTrainedTokenizerBase:
    """Learn `num_new_tokens` new tokens from `corpus` on top of `base_tokenizer` (BPE training, continued).

    Each new token is the most frequent adjacent pair of current tokens inside the words of `corpus`, as in BPE
    training, starting from the backbone's own tokenization. New tokens get the ids after the base vocabulary.

    Args:
        base_tokenizer: a fast BPE tokenizer (byte-level or not).
        corpus: the domain's texts.
        num_new_tokens: how many tokens to learn (fewer if the corpus has no pair seen `min_frequency` times).
        min_frequency: a pair must occur at least this often to become a token.

    Returns:
        A tokenizer of the same class as `base_tokenizer`, a strict superset of it.
    """
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be at least 1, got {num_new_tokens}.")
    words = _words(base_tokenizer, corpus)
    if not words:
        raise ValueError("The corpus is empty: there is no text to learn domain tokens from.")
    model = base_tokenizer.backend_tokenizer.model
    vocab = dict(base_tokenizer.get_vocab())
    # Every word as its backbone tokens; pair counts weighted by word frequency; which words hold each pair.
    segmented = [[piece.value for piece in model.tokenize(word)] for word in words]
    counts = list(words.values())
    pair_counts: Counter = Counter()
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, tokens in enumerate(segmented):
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] += counts[index]
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    new_tokens: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    next_id = max(max(vocab.values()), max(base_tokenizer.added_tokens_decoder, default=-1)) + 1
    while len(new_tokens) < num_new_tokens and heap:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts.get(pair, 0):
            continue  # stale heap entry
        if -negative_count < min_frequency:
            break
        merged = pair[0] + pair[1]
        if merged not in vocab:
            vocab[merged] = next_id
            new_tokens[merged] = next_id
            next_id += 1
        merges.append(pair)
        for index in list(pair_words.pop(pair, ())):
            tokens, count = segmented[index], counts[index]
            for old in zip(tokens, tokens[1:]):
                pair_counts[old] -= count
            joined, i = [], 0
            while i < len(tokens):
                if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
                    joined.append(merged)
                    i += 2
                else:
                    joined.append(tokens[i])
                    i += 1
            segmented[index] = joined
            for new_pair in zip(joined, joined[1:]):
                pair_counts[new_pair] += count
                pair_words[new_pair].add(index)
                heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
        pair_counts.pop(pair, None)
    if not merges:
        raise ValueError(f"No pair of tokens occurs {min_frequency} times in the corpus; nothing to learn.")
    return add_tokens_at_ids(base_tokenizer, new_tokens, merges)


__all__ = ["add_tokens_at_ids", "backbone_pieces", "extend_tokenizer", "new_tokens_of", "rebuild_tokenizer"]
