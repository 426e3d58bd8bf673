"""Every call the server makes to the model and its tokenizers, in one place.

The rest of the server sees token ids, route indices and logits only, so a change of the model's tokenization API
touches this file alone.
"""

import threading

import torch

from ..modeling_domain_experts import CACHE_NAME

BASE = "base"
"""Route name of the bare backbone."""
AUTO = "auto"
"""Route name of "the learned gate decides" (the bare backbone when no domain has a trained gate)."""

BASE_ROUTE = -1
"""Route index of the bare backbone (as in `DomainExpertsForCausalLM.route`)."""


class ModelIO:
    """Tokenization, routing and forward passes of one `DomainExpertsForCausalLM` for the server.

    Routes are named: `base`, `auto`, or a domain name. A route index is a domain's index in `model.domain_names`,
    `BASE_ROUTE` for the bare backbone, or None for `auto` until the gate has decided.

    Tokenizer calls hold a lock: request handlers tokenize while the engine thread decodes, and a transformers fast
    tokenizer sets options of its `tokenizers` backend on every call. Forward passes (the gate's included) run in the
    engine thread, which owns the batch and its cache.
    """

    def __init__(self, model):
        if model.tokenizer is None:
            raise ValueError("The model has no tokenizer: save it with one (model.tokenizer) before serving it.")
        clashes = sorted({BASE, AUTO} & set(model.domain_names))
        if clashes:
            raise ValueError(f"Domain {clashes[0]!r} has the name of a server route; load it under another name "
                             f"(--domain-pack OTHER=PACK, or model.load_domain(..., name=...)).")
        self.model = model.eval()
        self.domain_names: list[str] = list(model.domain_names)
        self.route_names: list[str] = [BASE, AUTO, *self.domain_names]
        text_config = model.config.backbone_config.get_text_config(decoder=True)
        self.context_length: int = int(text_config.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        eos = model.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids: frozenset[int] = frozenset(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = model.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else next(iter(self.eos_token_ids), 0)
        self.device = model.device
        self._tokenizer_lock = threading.Lock()
        # Read once: the tokenizers do not change while serving, and `all_special_ids` is rebuilt on every access.
        self._special_ids = {
            route: frozenset(model.tokenizer.tokenizer_for(self._domain(route)).all_special_ids)
            for route in (BASE_ROUTE, *range(len(self.domain_names)))
        }

    # Routes ---------------------------------------------------------------------------------------------------------

    def route_index(self, name: str) -> int | None:
        """The route index of route `name`, one of `route_names` (None for `auto`)."""
        if name == AUTO:
            return None
        return BASE_ROUTE if name == BASE else self.domain_names.index(name)

    def route_name(self, index: int) -> str:
        """The route name of a decided route index."""
        return BASE if index == BASE_ROUTE else self.domain_names[index]

    def _domain(self, route: int | None) -> str | None:
        return self.domain_names[route] if route is not None and route >= 0 else None

    # Tokenization ---------------------------------------------------------------------------------------------------

    def encode_prompt(self, text: str, route: int | None) -> list[int]:
        """Token ids of a plain-text prompt for route `route`: the domain's tokenizer and control token first.

        `auto` and `base` prompts carry no control token; typed control tokens stay plain text.
        """
        with self._tokenizer_lock:
            return list(self.model.tokenizer(text, domain=self._domain(route))["input_ids"])

    def encode_chat(self, messages: list[dict], route: int | None) -> list[int]:
        """Token ids of a chat (with the generation prompt) in the route's tokenizer, control token first.

        The chat template's own special tokens are kept; special tokens typed inside messages are plain text.
        """
        domain = self._domain(route)
        with self._tokenizer_lock:
            if self.model.tokenizer.tokenizer_for(domain).chat_template is None:
                raise ValueError("The model's tokenizer has no chat template: use /v1/completions with plain text.")
            return list(self.model.tokenizer.apply_chat_template(messages, domain=domain,
                                                                  add_generation_prompt=True)["input_ids"])

    def decode(self, token_ids: list[int], route: int) -> str:
        """Text of generated tokens of a row on route `route`, in that route's tokenizer (special tokens skipped)."""
        with self._tokenizer_lock:
            return self.model.tokenizer.tokenizer_for(self._domain(route)).decode(token_ids, skip_special_tokens=True)

    def is_special(self, token_id: int, route: int) -> bool:
        """Whether `token_id` is a special token of the route's tokenizer (EOS, control tokens, ...)."""
        return token_id in self._special_ids[route]

    # Forward passes (engine thread only) ----------------------------------------------------------------------------

    def decide_routes(self, prompts: list[list[int]], routes: list[int | None]) -> torch.LongTensor:
        """Route index of each prompt: as given, or for `auto` (None) what the gate decides on the prompt.

        Returns `torch.LongTensor` of shape `(len(prompts),)`.
        """
        decided = torch.tensor([BASE_ROUTE if route is None else route for route in routes], dtype=torch.long)
        gated = [row for row, route in enumerate(routes) if route is None]
        if gated:
            input_ids, attention_mask = self.left_pad([prompts[row] for row in gated])
            decided[gated] = self.model.route(input_ids, attention_mask).cpu()
        return decided

    def left_pad(self, prompts: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """`input_ids` and `attention_mask` (`torch.LongTensor`s of shape `(len(prompts), longest)`), padded on the
        left, on the model's device."""
        longest = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(prompts):
            if ids:
                input_ids[row, -len(ids):] = torch.tensor(ids)
                attention_mask[row, -len(ids):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache,
        domain_ids: torch.LongTensor,
    ):
        """One forward pass with the KV cache; returns the next-token logits `(batch, vocab_size)` in float32 and the
        cache.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, new_tokens)`): the prompt (prefill) or the last tokens.
            attention_mask (`torch.LongTensor` of shape `(batch, past + new_tokens)`): 0 for left padding.
            position_ids (`torch.LongTensor` of shape `(batch, new_tokens)`).
            cache: the cache of the previous call, or None for the prefill.
            domain_ids (`torch.LongTensor` of shape `(batch,)`): each row's route, kept from the prompt.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            domain_ids=domain_ids.to(self.device),
            logits_to_keep=1,
        )
        return outputs.logits[:, -1, :].float(), getattr(outputs, CACHE_NAME)

    @staticmethod
    def keep_rows(cache, rows: torch.LongTensor) -> None:
        """Keep only batch rows `rows` (`torch.LongTensor` of shape `(kept,)`) in `cache`, in place."""
        cache.batch_select_indices(rows)

