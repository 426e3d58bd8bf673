# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""Domain tokenizers: a backbone's BPE tokenizer extended with tokens learned from a domain's text.

This file is copied next to every saved model and loaded with `trust_remote_code=True`, so it imports only the standard
library, transformers and the model's configuration file, and must stay self-contained.

A domain tokenizer is a strict superset of its backbone's tokenizer: every backbone token keeps its id, and the new
tokens are merges of backbone tokens appended after all backbone merges. Because BPE applies merges in rank order and the
new merges rank last, a domain tokenizer first produces exactly the backbone's tokens, then joins some of them: decoding
is unchanged, and every new token stands for a known sequence of backbone tokens (which is where its embedding starts).
"""

import copy
import heapq
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable

from transformers import AddedToken, AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from .configuration_domain_experts import DomainExpertsConfig, control_token_for


DOMAIN_TOKENIZERS_FOLDER = "domain_tokenizers"
"""Where a saved model keeps the tokenizer of each domain that has tokens of its own: `domain_tokenizers/NAME/`."""


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
    # Added tokens outside the model vocabulary (a chat token after it, say) join it at their ids: a tokenizer that is
    # loaded renumbers added tokens past the model vocabulary, which new entries would otherwise collide with.
    for entry in data["added_tokens"]:
        vocab.setdefault(entry["content"], entry["id"])
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


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer of a DomainExperts model
# ----------------------------------------------------------------------------------------------------------------


class DomainExpertsTokenizer:
    """The tokenizers of a DomainExperts model behind one object, used like a transformers tokenizer.

    It holds the backbone's tokenizer with every domain's control token (`base`, saved at the root of a model folder,
    where `AutoTokenizer` finds it) and the tokenizer of each domain that has tokens of its own. Plain text never
    produces a control token (`base` splits special tokens); a caller asks for a domain with `domain=`:

    ```python
    >>> batch = model.tokenizer(["Title: Soup", "Once upon a time"], domain=["recipes", None], padding=True,
    ...                         return_tensors="pt")
    >>> model.tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    ```

    Each row is encoded by its domain's tokenizer with the domain's control token first (after BOS, if the tokenizer
    adds one), and decoded by the tokenizer of the domain its tokens belong to. Nothing here runs a model: a row that
    holds no domain token decodes with `base`, which decodes every backbone token as the domain tokenizers do.

    Objects of this class are never changed: adding a domain to a model gives the model a new one. Attributes it does
    not define (`pad_token_id`, `eos_token_id`, `chat_template`, `get_vocab`, ...) are those of `base`.

    Args:
        base (`PreTrainedTokenizerBase`): the backbone's tokenizer plus every domain's control token.
        domain_tokenizers (`dict[str, PreTrainedTokenizerBase]`): the tokenizers of the domains with tokens of their own.
        domain_token_ids (`dict[str, list[int]]`): each domain's token ids, control token first (the model config's).
        backbone_vocab_size (`int`): ids below it are the backbone's.
    """

    def __init__(
        self,
        base: PreTrainedTokenizerBase,
        domain_tokenizers: dict[str, PreTrainedTokenizerBase] | None = None,
        domain_token_ids: dict[str, list[int]] | None = None,
        backbone_vocab_size: int | None = None,
    ):
        self.base = base
        self.domain_tokenizers = dict(domain_tokenizers or {})
        self.domain_token_ids = {name: list(ids) for name, ids in (domain_token_ids or {}).items()}
        self.backbone_vocab_size = backbone_vocab_size if backbone_vocab_size is not None else len(base)
        # id -> owning domain, for the ids past the backbone vocabulary (the only ids a domain can own).
        self._owner_of_id = {token_id: name for name, ids in self.domain_token_ids.items() for token_id in ids}
        self._chat_tokenizers: dict[str | None, PreTrainedTokenizerBase] = {}

    # Attributes of `base` (pad_token_id, chat_template, ...) read through this object.
    def __getattr__(self, name: str):
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        domains = ", ".join(self.domain_token_ids) or "none"
        return f"{type(self).__name__}(base={type(self.base).__name__}, domains: {domains})"

    @property
    def padding_side(self) -> str:
        return self.base.padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        for tokenizer in (self.base, *self.domain_tokenizers.values()):
            tokenizer.padding_side = side

    @property
    def domain_names(self) -> list[str]:
        return list(self.domain_token_ids)

    def tokenizer_for(self, domain: str | None) -> PreTrainedTokenizerBase:
        """The tokenizer that encodes rows of `domain`: its own if it has tokens of its own, else `base` (also for None)."""
        if domain is None:
            return self.base
        self._check_domain(domain)
        return self.domain_tokenizers.get(domain, self.base)

    def control_token_id(self, domain: str) -> int:
        """The id of `<|domain:NAME|>`."""
        self._check_domain(domain)
        return self.domain_token_ids[domain][0]

    def _check_domain(self, domain: str) -> None:
        if domain not in self.domain_token_ids:
            known = ", ".join(repr(n) for n in self.domain_token_ids) or "none"
            raise KeyError(f"Unknown domain {domain!r}; this model has: {known}.")

    def _row_domains(self, domain, num_rows: int) -> list[str | None]:
        domains = list(domain) if isinstance(domain, (list, tuple)) else [domain] * num_rows
        if len(domains) != num_rows:
            raise ValueError(f"Got {num_rows} rows but {len(domains)} domains.")
        for name in set(domains) - {None}:
            self._check_domain(name)
        return domains

    # Encoding ----------------------------------------------------------------------------------------------------

    def __call__(self, text: str | list[str], domain: str | list[str | None] | None = None, **kwargs) -> BatchEncoding:
        """Tokenize `text` (one text or a batch) like a transformers tokenizer, each row for its domain.

        Args:
            text: one text or a list of texts.
            domain: a domain name for every row, one name (or None for the bare backbone) per row, or None.
            kwargs: as for a transformers tokenizer (`padding`, `truncation`, `max_length`, `return_tensors`,
                `padding_side`, ...). `max_length` counts the control token.

        Returns:
            `BatchEncoding` with `input_ids` and `attention_mask`.
        """
        single = isinstance(text, str)
        is_batch = isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text)
        if not (single or is_batch or kwargs.get("is_split_into_words")):
            got = repr(text)[:80] if isinstance(text, (list, tuple)) else type(text).__name__
            raise ValueError(f"text must be a string or a non-empty list of strings, got {got}.")
        texts = [text] if single else list(text)
        domains = self._row_domains(domain, len(texts))
        if all(name is None for name in domains):
            return self.base(text, **kwargs)
        padding = {key: kwargs.pop(key) for key in ("padding", "padding_side", "pad_to_multiple_of",
                                                    "return_tensors", "return_attention_mask") if key in kwargs}
        kwargs["split_special_tokens"] = kwargs.get("split_special_tokens", True)
        input_ids: list[list[int]] = [[] for _ in texts]
        for name in dict.fromkeys(domains):  # each domain's rows with its own tokenizer, in one call
            rows = [i for i, row_domain in enumerate(domains) if row_domain == name]
            row_kwargs = dict(kwargs)
            if name is not None and row_kwargs.get("truncation") and row_kwargs.get("max_length"):
                row_kwargs["max_length"] = row_kwargs["max_length"] - 1  # room for the control token
            encoded = self.tokenizer_for(name)([texts[i] for i in rows], **row_kwargs)
            for i, ids in zip(rows, encoded["input_ids"]):
                input_ids[i] = ids
        return self._route_and_pad(input_ids, domains, single, padding)

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], domain=None, **kwargs) -> BatchEncoding:
        """Tokenize chat(s) with `base`'s chat template, each row for its domain (see `__call__`).

        The template's own special tokens are kept; special tokens typed inside messages (a control token, say) are
        encoded as plain text (`sanitize_control_tokens=True`). Accepts `apply_chat_template`'s arguments
        (`add_generation_prompt`, `padding`, `return_tensors`, ...); always tokenizes.
        """
        if kwargs.get("tokenize") is False:
            raise ValueError("DomainExpertsTokenizer.apply_chat_template always tokenizes (a domain is chosen by a "
                             "token); call model.tokenizer.base.apply_chat_template(..., tokenize=False) for text.")
        single = bool(conversation) and isinstance(conversation[0], dict)
        chats = [conversation] if single else list(conversation)
        domains = self._row_domains(domain, len(chats))
        padding = {key: kwargs.pop(key) for key in ("padding", "padding_side", "pad_to_multiple_of",
                                                    "return_tensors", "return_attention_mask") if key in kwargs}
        kwargs.pop("return_dict", None)
        input_ids = [
            self._chat_tokenizer(name).apply_chat_template(chat, sanitize_control_tokens=True, return_dict=True,
                                                           **kwargs)["input_ids"]
            for chat, name in zip(chats, domains)
        ]
        return self._route_and_pad(input_ids, domains, single, padding)

    def _chat_tokenizer(self, domain: str | None) -> PreTrainedTokenizerBase:
        """A copy of `domain`'s tokenizer that parses special tokens: a chat template writes its own special tokens as
        text (those typed in messages are escaped by `sanitize_control_tokens`). A copy, so that `base` never changes
        (other threads may be encoding with it)."""
        tokenizer = self.tokenizer_for(domain)
        chat_tokenizer = self._chat_tokenizers.get(domain)
        if chat_tokenizer is None:
            chat_tokenizer = copy.deepcopy(tokenizer)
            chat_tokenizer.split_special_tokens = False
            self._chat_tokenizers[domain] = chat_tokenizer  # two threads may both build one: either is right
        return chat_tokenizer

    def _route_and_pad(self, input_ids: list[list[int]], domains: list[str | None], single: bool,
                       padding: dict) -> BatchEncoding:
        """Put each row's control token first (after BOS), then pad (as `padding` asks) or return lists."""
        bos = self.base.bos_token_id
        rows = []
        for ids, name in zip(input_ids, domains):
            ids = list(ids)
            if name is not None:
                insert_at = 1 if bos is not None and ids[:1] == [bos] else 0
                ids = ids[:insert_at] + [self.control_token_id(name)] + ids[insert_at:]
            rows.append(ids)
        if single and not padding.get("padding") and not padding.get("return_tensors"):
            return BatchEncoding({"input_ids": rows[0], "attention_mask": [1] * len(rows[0])})
        encoded = {"input_ids": rows, "attention_mask": [[1] * len(ids) for ids in rows]}
        return self.base.pad(encoded, padding=padding.get("padding", False), padding_side=padding.get("padding_side"),
                             pad_to_multiple_of=padding.get("pad_to_multiple_of"),
                             return_attention_mask=padding.get("return_attention_mask"),
                             return_tensors=padding.get("return_tensors"))

    # Decoding ----------------------------------------------------------------------------------------------------

    def domain_of(self, ids) -> str | None:
        """The domain owning the domain tokens of one row of ids (its control token or its own tokens), or None."""
        for token_id in ids:
            owner = self._owner_of_id.get(int(token_id))
            if owner is not None:
                return owner
        return None

    def decode(self, token_ids, **kwargs) -> str:
        """Decode one row with the tokenizer of the domain its tokens belong to (`base` if none)."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        return self.tokenizer_for(self.domain_of(ids)).decode(ids, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Decode each row of `sequences` (`(batch_size, length)` ids, e.g. from `generate`) as `decode` does."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else [list(row) for row in sequences]
        return [self.decode(row, **kwargs) for row in rows]

    # The backbone's tokenizer ------------------------------------------------------------------------------------

    def backbone_vocab(self) -> dict[str, int]:
        """The backbone tokenizer's vocabulary (token -> id), without any domain token."""
        return {token: i for token, i in self.base.get_vocab().items() if i < self.backbone_vocab_size}

    def backbone_tokenizer(self) -> PreTrainedTokenizerBase:
        """The backbone's tokenizer as it was given to the model: `base` less every control token."""
        data = json.loads(self.base.backend_tokenizer.to_str())
        data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < self.backbone_vocab_size}
        data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < self.backbone_vocab_size]
        data["padding"] = data["truncation"] = None  # what the last call asked for, not part of the tokenizer
        tokenizer = rebuild_tokenizer(self.base, data)
        tokenizer.split_special_tokens = False
        tokenizer.init_kwargs["split_special_tokens"] = False
        return tokenizer

    # Domains: each change gives a new object ---------------------------------------------------------------------

    @classmethod
    def for_backbone(cls, tokenizer: PreTrainedTokenizerBase, backbone_vocab_size: int) -> "DomainExpertsTokenizer":
        """A tokenizer with no domain yet, over a copy of the backbone's `tokenizer` (which is never changed)."""
        if len(tokenizer) > backbone_vocab_size:
            raise ValueError(
                f"The tokenizer gives {len(tokenizer)} ids, but the backbone has {backbone_vocab_size} embedding rows: "
                "they do not belong together. Pass the backbone's own tokenizer."
            )
        base = rebuild_tokenizer(tokenizer, json.loads(tokenizer.backend_tokenizer.to_str()))
        _split_special_tokens(base)
        return cls(base, backbone_vocab_size=backbone_vocab_size)

    def with_domain(self, name: str, token_ids: list[int], new_tokens: list[str] = (),
                    domain_tokenizer: PreTrainedTokenizerBase | None = None) -> "DomainExpertsTokenizer":
        """This tokenizer plus domain `name`: its control token at `token_ids[0]` and, when `new_tokens` are given, its
        own tokenizer (a superset of the backbone's holding `new_tokens`, moved to `token_ids[1:]`)."""
        control_token = control_token_for(name)
        base = add_tokens_at_ids(self.base, {control_token: token_ids[0]}, special_tokens=[control_token])
        _split_special_tokens(base)
        domain_tokenizers = dict(self.domain_tokenizers)
        if new_tokens:
            ids = {control_token: token_ids[0], **dict(zip(new_tokens, token_ids[1:]))}
            own = add_tokens_at_ids(domain_tokenizer, ids, special_tokens=[control_token])
            _split_special_tokens(own)
            domain_tokenizers[name] = own
        return type(self)(base, domain_tokenizers, {**self.domain_token_ids, name: list(token_ids)},
                          self.backbone_vocab_size)

    def without_domain(self, name: str) -> "DomainExpertsTokenizer":
        """This tokenizer less domain `name`'s own tokenizer. Its control token stays in `base` (the id stays reserved,
        never produced by text since special tokens are split)."""
        self._check_domain(name)
        domain_tokenizers = {n: t for n, t in self.domain_tokenizers.items() if n != name}
        domain_token_ids = {n: ids for n, ids in self.domain_token_ids.items() if n != name}
        return type(self)(self.base, domain_tokenizers, domain_token_ids, self.backbone_vocab_size)

    # Saving and loading ------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save `base` to `save_directory` and each domain tokenizer to `save_directory/domain_tokenizers/NAME`."""
        self.base.save_pretrained(save_directory, **kwargs)
        for name, tokenizer in self.domain_tokenizers.items():
            tokenizer.save_pretrained(os.path.join(save_directory, DOMAIN_TOKENIZERS_FOLDER, name), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, config: DomainExpertsConfig | None = None,
                        trust_remote_code: bool = False, **hub_kwargs) -> "DomainExpertsTokenizer":
        """Load the tokenizers a DomainExperts model saved (see `save_pretrained`), from a folder or Hub repo.

        No code from the folder runs unless `trust_remote_code=True`: the tokenizers are data files of standard
        transformers classes. `config` (the model's) is read from the folder when not given.
        """
        if config is None:
            config = DomainExpertsConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        base = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code,
                                             **hub_kwargs)
        domain_tokenizers = {
            name: AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code,
                                                subfolder=f"{DOMAIN_TOKENIZERS_FOLDER}/{name}", **hub_kwargs)
            for name, settings in config.domains.items()
            if len(settings["token_ids"]) > 1
        }
        domain_token_ids = {name: settings["token_ids"] for name, settings in config.domains.items()}
        return cls(base, domain_tokenizers, domain_token_ids, config.backbone_vocab_size)


def _split_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make plain text never produce a special token (a control token, above all), now and once saved."""
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True


__all__ = [
    "DOMAIN_TOKENIZERS_FOLDER",
    "DomainExpertsTokenizer",
    "add_tokens_at_ids",
    "backbone_pieces",
    "extend_tokenizer",
    "new_tokens_of",
    "rebuild_tokenizer",
]
