# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""DomainExperts: one frozen causal LM serving several domains through per-domain expansion blocks.

This file is copied next to every saved model and loaded with `trust_remote_code=True`, so it imports only torch,
transformers and `configuration_domain_experts.py`, and must stay self-contained.

How a forward pass works:

1. Every row of the batch is routed: to the domain whose control token (`<|domain:NAME|>`) is its first token
   (after an optional BOS), or to the bare backbone (domain index -1).
2. Input embeddings come from the frozen backbone, except for ids past the backbone vocabulary: those are domain
   tokens, embedded by the domain that owns them. A row may only contain tokens of its own domain.
3. The backbone runs its own forward. A forward hook on each of its decoder layers runs, after that layer, the
   expansion blocks that a domain placed there, on that domain's rows only, with the very inputs (attention mask,
   rotary embeddings, position ids) the backbone gave the layer they sit beside.
4. Logits over the backbone vocabulary are the backbone's own; domain-token columns are `-inf` (control tokens are
   never generated).

Rows routed to the bare backbone never touch a domain parameter, so their logits are bit-identical to the backbone's.
"""

import copy
import json
import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_domain_experts import DomainExpertsConfig, control_token_for
from .tokenization_domain_experts import (
    add_tokens_at_ids,
    backbone_pieces,
    extend_tokenizer,
    new_tokens_of,
    rebuild_tokenizer,
)


logger = logging.get_logger(__name__)

# Names of the projections that write a decoder block's attention and MLP outputs into the residual stream, across
# the common causal LM families (Llama/Qwen2/Mistral/Gemma: o_proj, down_proj; GPT-2: c_proj; GPT-NeoX: dense,
# dense_4h_to_h; OPT/GPT-Neo/Phi: out_proj, fc2; T5-style and MoE experts: wo, w2). Zeroing them turns a copied
# block into an exact identity, the LLaMA Pro initialisation.
RESIDUAL_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2", "wo", "w2")

DOMAIN_TOKENIZERS_FOLDER = "domain_tokenizers"

BASE_ROUTE = -1
"""Domain index of a row that runs on the bare backbone."""


@dataclass
class DomainExpertsCausalLMOutputWithPast(CausalLMOutputWithPast):
    """[`CausalLMOutputWithPast`] plus `domain_ids` (`torch.LongTensor` of shape `(batch_size,)`): each row's route."""

    domain_ids: torch.LongTensor | None = None


class _StopForward(Exception):
    """Raised by a hook to end a backbone forward pass early, carrying the hidden states it stopped at."""

    def __init__(self, hidden_states: torch.Tensor):
        super().__init__()
        self.hidden_states = hidden_states


def find_decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` holding the backbone's decoder blocks (`model.layers`, `transformer.h`, ...)."""
    num_layers = backbone.config.get_text_config(decoder=True).num_hidden_layers
    for _, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(
        f"Cannot find the decoder layers of {type(backbone).__name__}: no nn.ModuleList of num_hidden_layers="
        f"{num_layers} blocks. DomainExperts needs a backbone whose decoder blocks sit in one nn.ModuleList."
    )


def make_identity_block(layer: nn.Module, cache_index: int) -> nn.Module:
    """A trainable copy of decoder `layer` whose output equals its input exactly, writing its KV cache at `cache_index`.

    The residual-stream output projections of attention and MLP are zeroed, so the block adds exact zeros to its input.
    """
    block = copy.deepcopy(layer)
    zeroed = []
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUT_PROJECTIONS and getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            zeroed.append(name)
    if len(zeroed) < 2:
        raise ValueError(
            f"Cannot make an identity expansion block from {type(layer).__name__}: expected its attention and MLP "
            f"output projections among submodules named {RESIDUAL_OUTPUT_PROJECTIONS}, found {zeroed or 'none'}."
        )
    set_cache_index(block, cache_index)
    block.requires_grad_(True)
    return block


def set_cache_index(block: nn.Module, cache_index: int) -> None:
    """Point every attention module in `block` at KV-cache layer `cache_index`."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = cache_index


class DomainExpansion(nn.Module):
    """The parameters one domain adds to the backbone.

    Attributes:
        blocks (`nn.ModuleDict[str, nn.ModuleList]`): expansion blocks keyed by the backbone layer index they follow.
        token_embeddings (`nn.Parameter` of shape `(num_tokens, hidden_size)`): input embeddings of the domain's
            tokens, in the order of `config.domains[name]["token_ids"]`; row 0 is the control token, the rest are the
            tokens of the domain's tokenizer.
        output_embeddings (`nn.Parameter` of shape `(num_tokens - 1, hidden_size)`, or None): output rows of the
            domain's tokenizer tokens, when the backbone does not tie its output embeddings to its input embeddings
            (when it does, `token_embeddings[1:]` serve as output rows too).
        output_bias (`nn.Parameter` of shape `(num_tokens - 1,)`, or None): when the backbone's LM head has a bias.
        gate_weight (`nn.Parameter` of shape `(hidden_size,)`), gate_bias (`nn.Parameter` of shape `(1,)`): the
            domain's entry in the learned gate, a logistic score on the mean gate-layer hidden state of a prompt.
    """

    def __init__(
        self,
        decoder_layers: nn.ModuleList,
        expansion_layers: list[int],
        num_tokens: int,
        hidden_size: int,
        untied_output: bool,
        output_bias: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for layer_index in expansion_layers:
            depth = str(layer_index)
            if depth not in self.blocks:
                self.blocks[depth] = nn.ModuleList()
            # The cache index is reassigned by the model once all domains are known.
            self.blocks[depth].append(make_identity_block(decoder_layers[layer_index], cache_index=-1))
        dtype = decoder_layers[0].parameters().__next__().dtype
        self.token_embeddings = nn.Parameter(torch.zeros(num_tokens, hidden_size, dtype=dtype))
        num_vocabulary_tokens = num_tokens - 1
        self.output_embeddings = None
        self.output_bias = None
        if num_vocabulary_tokens and untied_output:
            self.output_embeddings = nn.Parameter(torch.zeros(num_vocabulary_tokens, hidden_size, dtype=dtype))
        if num_vocabulary_tokens and output_bias:
            self.output_bias = nn.Parameter(torch.zeros(num_vocabulary_tokens, dtype=dtype))
        # Trained by `domain_experts.gate.train_gate`, not with the domain: no gradient reaches them in `forward`.
        self.gate_weight = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32), requires_grad=False)
        self.gate_bias = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)

    def output_weight(self) -> torch.Tensor | None:
        """Output rows `(num_tokens - 1, hidden_size)` of the domain's tokenizer tokens, or None if it has none."""
        if self.token_embeddings.shape[0] == 1:
            return None
        return self.output_embeddings if self.output_embeddings is not None else self.token_embeddings[1:]


class _RowSubsetCache:
    """The KV cache as seen by the expansion blocks of one domain, which run on the batch rows `rows` only.

    Expansion layers keep full-batch storage (zeros in the rows of other routes) so that every cache operation of
    generation (beam reordering, repeat-interleave, cropping) stays valid; this view scatters the sub-batch's new keys
    and values into it and gathers the sub-batch's history back.
    """

    def __init__(self, cache, rows: torch.Tensor, batch_size: int):
        self.cache = cache
        self.rows = rows
        self.batch_size = batch_size

    def _scatter(self, states: torch.Tensor) -> torch.Tensor:
        full = states.new_zeros((self.batch_size, *states.shape[1:]))
        return full.index_copy(0, self.rows, states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.cache.update(self._scatter(key_states), self._scatter(value_states), layer_idx, *args, **kwargs)
        return keys.index_select(0, self.rows), values.index_select(0, self.rows)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _select_rows(value, rows: torch.Tensor, batch_size: int):
    """`value` restricted to batch rows `rows`: batch-first tensors (ndim >= 2) are sliced, caches get a row view."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_size:
            return value.index_select(0, rows)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(item, rows, batch_size) for item in value)
    if hasattr(value, "update") and hasattr(value, "get_seq_length"):
        return _RowSubsetCache(value, rows, batch_size)
    return value


class DomainExpertsPreTrainedModel(PreTrainedModel):
    config_class = DomainExpertsConfig
    config: DomainExpertsConfig
    base_model_prefix = "domain_experts"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Nothing to draw at random: the backbone brings its own weights (pretrained, or initialised by its own class
        # when built from a config) and domain parameters are copies made exact identities in `add_domain`. Running an
        # initialiser here would overwrite them (transformers calls this on every module of a custom model).
        return


class DomainExpertsForCausalLM(DomainExpertsPreTrainedModel, GenerationMixin):
    r"""
    A frozen causal LM (the backbone) extended with per-domain expansion blocks and domain tokens.

    Build one with [`~DomainExpertsForCausalLM.from_backbone`], add domains with [`~DomainExpertsForCausalLM.add_domain`],
    train the parameters of [`~DomainExpertsForCausalLM.domain_parameters`], and use it as any transformers causal LM
    (`forward` with `labels`, `generate`, `save_pretrained`, `from_pretrained`).

    Example:

    ```python
    >>> from domain_experts import DomainExpertsForCausalLM
    >>> model = DomainExpertsForCausalLM.from_backbone("HuggingFaceTB/SmolLM2-135M")
    >>> model.add_domain("recipes", num_blocks=4)
    >>> inputs = model.tokenize(["Title: Pancakes"], domain="recipes")
    >>> model.generate(**inputs, max_new_tokens=20)
    ```
    """

    def __init__(self, config: DomainExpertsConfig, backbone: PreTrainedModel | None = None, tokenizer=None):
        super().__init__(config)
        if backbone is None:
            backbone = AutoModelForCausalLM.from_config(config.backbone_config)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.tokenizer = tokenizer
        # Tokenizers of the domains that extend the backbone's vocabulary (the others use `tokenizer`).
        self.domain_tokenizers: dict = {}
        self.domains = nn.ModuleDict()
        for name, settings in config.domains.items():
            self.domains[name] = self._new_domain_module(settings["expansion_layers"], len(settings["token_ids"]))
        self._assign_cache_indices()
        # Routing of the batch in flight, read by the hooks: {domain index: rows}; None outside a forward pass.
        self._active_routes: dict[int, torch.Tensor] | None = None
        for layer_index, layer in enumerate(self._decoder_layers):
            layer.register_forward_hook(partial(self._run_expansion_blocks, layer_index), with_kwargs=True)
        # The hidden states entering the LM head, kept during a forward pass for the domains' own output rows.
        self._final_hidden_states: torch.Tensor | None = None
        self.backbone.get_output_embeddings().register_forward_pre_hook(self._keep_final_hidden_states)
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # Construction and domain management
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        backbone: PreTrainedModel | str,
        tokenizer=None,
        domains: list | None = None,
        **from_pretrained_kwargs,
    ) -> "DomainExpertsForCausalLM":
        """Wrap a causal LM, freezing all of its parameters.

        Args:
            backbone: a loaded causal LM, or a model id / path passed to `AutoModelForCausalLM.from_pretrained`.
            tokenizer: the backbone's tokenizer (loaded from `backbone` when that is an id or path and this is None).
                Adding a domain gives `model.tokenizer` a copy of it with the domain's control token: the tokenizer
                passed here is never changed.
            domains: domain packs to load, in order (see [`load_domain`]): each a pack folder or Hub repo id, or a dict
                of `load_domain` arguments, e.g. `{"repo_id_or_path": "bob/legal", "revision": "v1", "name": "law"}`.
            from_pretrained_kwargs: passed to `from_pretrained` when `backbone` is an id or path.
        """
        if isinstance(backbone, str):
            name_or_path = backbone
            backbone = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(
                    name_or_path, **{k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "token")}
                )
        if not isinstance(backbone, PreTrainedModel) or not hasattr(backbone, "get_input_embeddings"):
            raise TypeError(f"backbone must be a transformers causal LM or a model id, got {type(backbone).__name__}.")
        if isinstance(backbone, DomainExpertsForCausalLM):
            raise TypeError("backbone is already a DomainExpertsForCausalLM; add domains to it directly.")
        find_decoder_layers(backbone)  # fail early, with a clear message, on an architecture we cannot extend
        backbone_config = backbone.config
        text_config = backbone_config.get_text_config(decoder=True)
        bos_token_id = tokenizer.bos_token_id if tokenizer is not None else text_config.bos_token_id
        config = DomainExpertsConfig(
            backbone_config=backbone_config,
            bos_token_id=bos_token_id if isinstance(bos_token_id, int) else None,
            eos_token_id=text_config.eos_token_id,
            pad_token_id=text_config.pad_token_id,
            attn_implementation=backbone_config._attn_implementation,
        )
        model = cls(config, backbone=backbone, tokenizer=tokenizer)
        model.generation_config = copy.deepcopy(backbone.generation_config)
        if domains:
            cls._packs().load_packs(model, domains)
        return model

    @property
    def _decoder_layers(self) -> nn.ModuleList:
        # Looked up, not stored: an attribute holding the ModuleList would register the backbone layers twice.
        return find_decoder_layers(self.backbone)

    @property
    def domain_names(self) -> list[str]:
        """Names of the domains, in the order they were added."""
        return list(self.domains.keys())

    def add_domain(
        self,
        name: str,
        num_blocks: int = 4,
        expansion_layers: list[int] | None = None,
        tokenizer=None,
        corpus=None,
        num_new_tokens: int | None = None,
    ) -> None:
        """Add a domain: expansion blocks that start as exact identities, a control token `<|domain:NAME|>`, and
        optionally tokens of its own.

        Args:
            name: the domain's name (letters, digits, `_`, `-` and `.`).
            num_blocks: how many expansion blocks, spread evenly over the depth (block `i` follows the last layer of
                the `i`-th of `num_blocks` equal groups of backbone layers, as in LLaMA Pro).
            expansion_layers: instead of `num_blocks`, the backbone layer index after which each block runs.
            tokenizer: a ready domain tokenizer, a strict superset of the backbone's (e.g. from `extend_tokenizer`).
            corpus: instead of `tokenizer`, the domain's texts, from which `num_new_tokens` tokens are learned.
            num_new_tokens: how many tokens to learn from `corpus`.

        The domain's tokens get ids past every id given out so far, in one contiguous range (control token first); their
        embeddings start at the mean of the backbone embeddings of the pieces each token joins, and belong to the domain.
        `tokenizer_for(name)` returns the domain's tokenizer.
        """
        if not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"Invalid domain name {name!r}: use letters, digits, '_', '-' and '.'.")
        if name in self.domains:
            raise ValueError(f"Domain {name!r} already exists; remove it first or pick another name.")
        num_layers = len(self._decoder_layers)
        if expansion_layers is None:
            if not 1 <= num_blocks <= num_layers:
                raise ValueError(f"num_blocks must be between 1 and the backbone's {num_layers} layers, got {num_blocks}.")
            expansion_layers = [(i + 1) * num_layers // num_blocks - 1 for i in range(num_blocks)]
        expansion_layers = sorted(int(i) for i in expansion_layers)
        if not expansion_layers or not all(0 <= i < num_layers for i in expansion_layers):
            raise ValueError(
                f"expansion_layers must be a non-empty list of layer indices in [0, {num_layers}), got {expansion_layers}."
            )
        if (tokenizer is not None or corpus is not None) and self.tokenizer is None:
            raise ValueError("Domain tokens need the backbone's tokenizer: pass it to from_backbone.")
        if tokenizer is not None and corpus is not None:
            raise ValueError("Pass either a ready domain tokenizer or a corpus to learn one from, not both.")
        if corpus is not None:
            if num_new_tokens is None:
                raise ValueError("Learning domain tokens from a corpus needs num_new_tokens.")
            tokenizer = extend_tokenizer(self._backbone_tokenizer(), corpus, num_new_tokens)
        elif num_new_tokens is not None:
            raise ValueError("num_new_tokens needs a corpus to learn the tokens from.")
        new_tokens = new_tokens_of(tokenizer, self._backbone_vocab()) if tokenizer is not None else []
        if tokenizer is not None and not new_tokens:
            raise ValueError("The domain tokenizer adds no token to the backbone's tokenizer.")

        self._attach_domain(name, expansion_layers, new_tokens, tokenizer)

    def _attach_domain(
        self,
        name: str,
        expansion_layers: list[int],
        new_tokens: list[str],
        domain_tokenizer=None,
        state_dict: dict[str, torch.Tensor] | None = None,
        gate_trained: bool = False,
    ) -> None:
        """Give domain `name` its ids, tokenizer entries and parameters: the one way a domain enters the model.

        Args:
            expansion_layers: the backbone layer each expansion block follows.
            new_tokens: the domain's own tokens (strings of `domain_tokenizer`), in order; may be empty.
            domain_tokenizer: a superset of the backbone tokenizer holding `new_tokens` (at any ids: they are moved).
            state_dict: the domain's tensors (as in `model.domains[name].state_dict()`), e.g. from a pack; None to
                start fresh (identity blocks, token embeddings from the backbone's).
            gate_trained: whether the gate entry in `state_dict` is trained.
        """
        control_token = control_token_for(name)
        first_id = self.config.vocab_size
        token_ids = list(range(first_id, first_id + 1 + len(new_tokens)))
        domain = self._new_domain_module(expansion_layers, len(token_ids))
        if state_dict is None:
            self._init_token_embeddings(domain, new_tokens)
        else:
            domain.load_state_dict(state_dict, strict=True)
        if self.tokenizer is not None:
            shared = add_tokens_at_ids(self.tokenizer, {control_token: first_id}, special_tokens=[control_token])
            own = None
            if new_tokens:
                ids = {control_token: first_id, **dict(zip(new_tokens, token_ids[1:]))}
                own = add_tokens_at_ids(domain_tokenizer, ids, special_tokens=[control_token])
            for tokenizer in (shared, own):
                if tokenizer is not None:  # plain text never produces a control token
                    tokenizer.split_special_tokens = True
                    tokenizer.init_kwargs["split_special_tokens"] = True
            self.tokenizer = shared
            if own is not None:
                self.domain_tokenizers[name] = own
        self.domains[name] = domain
        self.config.domains[name] = {
            "expansion_layers": list(expansion_layers),
            "token_ids": token_ids,
            "tokens": [control_token, *new_tokens],
            "gate": gate_trained,
        }
        self.config.vocab_size = first_id + len(token_ids)
        self._assign_cache_indices()
        logger.info(
            f"Added domain {name!r}: {len(expansion_layers)} blocks after layers {expansion_layers}, "
            f"{control_token}={first_id}, {len(new_tokens)} tokens of its own."
        )

    def _new_domain_module(self, expansion_layers: list[int], num_tokens: int) -> DomainExpansion:
        input_embeddings = self.backbone.get_input_embeddings()
        output_embeddings = self.backbone.get_output_embeddings()
        domain = DomainExpansion(
            self._decoder_layers,
            expansion_layers,
            num_tokens,
            hidden_size=input_embeddings.weight.shape[1],
            # The config, not the tensors: while loading, the backbone's weights are not tied yet.
            untied_output=not self.config.backbone_config.get_text_config(decoder=True).tie_word_embeddings,
            output_bias=getattr(output_embeddings, "bias", None) is not None,
        )
        return domain.to(device=input_embeddings.weight.device)

    @torch.no_grad()
    def _init_token_embeddings(self, domain: DomainExpansion, new_tokens: list[str]) -> None:
        """Control token: the mean input embedding. Each new token: the mean of the backbone rows of its pieces."""
        input_weight = self.backbone.get_input_embeddings().weight
        output_module = self.backbone.get_output_embeddings()
        domain.token_embeddings[0] = input_weight.float().mean(dim=0).to(input_weight.dtype)
        backbone_tokenizer = self.tokenizer
        for row, token in enumerate(new_tokens):
            pieces = torch.tensor(backbone_pieces(backbone_tokenizer, token), device=input_weight.device)
            domain.token_embeddings[row + 1] = input_weight[pieces].float().mean(dim=0).to(input_weight.dtype)
            if domain.output_embeddings is not None:
                domain.output_embeddings[row] = output_module.weight[pieces].float().mean(dim=0)
            if domain.output_bias is not None:
                domain.output_bias[row] = output_module.bias[pieces].float().mean()

    def _backbone_vocab(self) -> dict[str, int]:
        """The backbone tokenizer's vocabulary (token -> id), without any domain token."""
        return {token: i for token, i in self.tokenizer.get_vocab().items() if i < self.config.backbone_vocab_size}

    def _backbone_tokenizer(self):
        """The backbone's tokenizer as given to `from_backbone`: the model's, less every control token."""
        backbone_vocab_size = self.config.backbone_vocab_size
        data = json.loads(self.tokenizer.backend_tokenizer.to_str())
        data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < backbone_vocab_size}
        data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < backbone_vocab_size]
        tokenizer = rebuild_tokenizer(self.tokenizer, data)
        tokenizer.split_special_tokens = False
        return tokenizer

    def tokenizer_for(self, name: str | None):
        """The tokenizer of domain `name` (the model's tokenizer when the domain has no tokens of its own, or for None)."""
        if name is None:
            return self.tokenizer
        self._check_domain(name)
        return self.domain_tokenizers.get(name, self.tokenizer)

    def remove_domain(self, name: str) -> None:
        """Remove a domain and all of its parameters. Its token ids stay reserved and are never given to another domain."""
        self._check_domain(name)
        del self.domains[name]
        del self.config.domains[name]
        self.domain_tokenizers.pop(name, None)
        self._assign_cache_indices()

    def domain_parameters(self, name: str):
        """The trainable parameters of domain `name` (and of no other domain), e.g. for an optimizer.

        The domain's gate entry is not among them: it is trained apart, by `domain_experts.gate.train_gate`.
        """
        self._check_domain(name)
        return (p for p in self.domains[name].parameters() if p.requires_grad)

    def control_token_id(self, name: str) -> int:
        """The id of `<|domain:NAME|>`."""
        self._check_domain(name)
        return self.config.domains[name]["token_ids"][0]

    def _check_domain(self, name: str) -> None:
        if name not in self.domains:
            known = ", ".join(repr(n) for n in self.domains) or "none"
            raise KeyError(f"Unknown domain {name!r}; this model has: {known}.")

    def _assign_cache_indices(self) -> None:
        """Give every expansion block its own KV-cache layer, numbered after the backbone's layers."""
        cache_index = self.config.num_backbone_layers
        self._cache_templates = []  # for each expansion cache index past the backbone, the layer it sits beside
        for domain in self.domains.values():
            for depth, blocks in domain.blocks.items():
                for block in blocks:
                    set_cache_index(block, cache_index)
                    self._cache_templates.append(int(depth))
                    cache_index += 1

    # ------------------------------------------------------------------------------------------------------------
    # Routing and token tables
    # ------------------------------------------------------------------------------------------------------------

    def _token_owner_table(self) -> torch.Tensor:
        """LongTensor of shape `(vocab_size,)`: for each id, the index of the domain owning it, or -1."""
        owner = torch.full((self.config.vocab_size,), BASE_ROUTE, dtype=torch.long)
        for index, name in enumerate(self.domains):
            owner[self.config.domains[name]["token_ids"]] = index
        return owner

    def _control_token_table(self) -> torch.Tensor:
        """LongTensor of shape `(vocab_size,)`: the domain index a control token routes to, or -1 for other ids."""
        table = torch.full((self.config.vocab_size,), BASE_ROUTE, dtype=torch.long)
        for index, name in enumerate(self.domains):
            table[self.config.domains[name]["token_ids"][0]] = index
        return table

    def route(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
        """Route each row: the index (in `domain_names`) of its domain, or -1 for the bare backbone.

        A row whose first token (after an optional BOS) is a domain's control token goes to that domain. Any other row
        goes where the learned gate sends it, if some domain has a trained gate entry (see `gate_probabilities`), and
        otherwise to the bare backbone.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): whole sequences, from their start.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens;
                the first real token of a left-padded row is its start.

        Returns:
            `torch.LongTensor` of shape `(batch_size,)`.
        """
        if attention_mask is not None and attention_mask.dim() == 2:
            start = attention_mask.long().argmax(dim=1)
        else:
            start = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        first = input_ids.gather(1, start[:, None])[:, 0]
        second = input_ids.gather(1, (start + 1).clamp(max=input_ids.shape[1] - 1)[:, None])[:, 0]
        candidate = first
        if self.config.bos_token_id is not None:
            candidate = torch.where(first == self.config.bos_token_id, second, first)
        table = self._control_token_table().to(input_ids.device)
        routes = table[candidate.clamp(0, self.config.vocab_size - 1)]
        ungated = (routes == BASE_ROUTE).nonzero()[:, 0]
        if ungated.numel() and any(settings.get("gate") for settings in self.config.domains.values()):
            mask = attention_mask.index_select(0, ungated) if attention_mask is not None and attention_mask.dim() == 2 else None
            probabilities = self.gate_probabilities(input_ids.index_select(0, ungated), mask)
            best, best_domain = probabilities.max(dim=-1)
            chosen = torch.where(best >= self.config.gate_threshold, best_domain, BASE_ROUTE)
            routes = routes.index_copy(0, ungated, chosen)
        return routes

    @torch.no_grad()
    def gate_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the gate reads: the mean over real tokens of the backbone's hidden states after `config.gate_layer`.

        Runs the backbone only up to that layer, without any domain. Position ids follow the attention mask, so a row's
        features do not depend on its padding.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`, in float32.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs_embeds = self.backbone.get_input_embeddings()(input_ids.clamp(max=self.config.backbone_vocab_size - 1))

        def stop(module, args, kwargs, output):
            raise _StopForward(output[0] if isinstance(output, tuple) else output)

        handle = self._decoder_layers[self.config.gate_layer].register_forward_hook(stop, with_kwargs=True)
        try:
            self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
            raise RuntimeError(f"The backbone never ran layer {self.config.gate_layer}.")
        except _StopForward as stopped:
            hidden_states = stopped.hidden_states.float()
        finally:
            handle.remove()
        weights = attention_mask.to(hidden_states.dtype)[..., None]
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def gate_probabilities(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """For each row and domain (in `domain_names` order), the gate's probability that the row belongs to it.

        Domains without a trained gate entry get 0. Returns `torch.FloatTensor` of shape `(batch_size, num_domains)`.
        """
        features = self.gate_features(input_ids, attention_mask)
        probabilities = torch.zeros(features.shape[0], len(self.domains), device=features.device)
        for index, (name, domain) in enumerate(self.domains.items()):
            if self.config.domains[name].get("gate"):
                probabilities[:, index] = torch.sigmoid(features @ domain.gate_weight + domain.gate_bias)
        return probabilities

    def _check_input_ids(self, input_ids: torch.LongTensor, domain_ids: torch.LongTensor) -> None:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got ids in "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}].")
        domain_tokens = input_ids >= self.config.backbone_vocab_size
        if not domain_tokens.any():
            return
        owner = self._token_owner_table().to(input_ids.device)[input_ids]
        foreign = domain_tokens & ((owner == BASE_ROUTE) | (owner != domain_ids[:, None]))
        if foreign.any():
            row, position = (int(i) for i in foreign.nonzero()[0])
            token_id = int(input_ids[row, position])
            owner_name = self.domain_names[owner[row, position]] if owner[row, position] >= 0 else None
            row_route = self.domain_names[domain_ids[row]] if domain_ids[row] >= 0 else "the bare backbone"
            raise ValueError(
                f"Row {row} is routed to {row_route!s} but holds token id {token_id} at position {position}, which "
                + (f"belongs to domain {owner_name!r}" if owner_name else "belongs to no domain (a removed one?)")
                + ". A domain's tokens may only appear in its own rows; a control token routes only as the first "
                "token (after an optional BOS)."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def _embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Input embeddings `(batch, seq, hidden)`: the backbone's, and the owning domain's for domain tokens."""
        embedding = self.backbone.get_input_embeddings()
        backbone_vocab_size = self.config.backbone_vocab_size
        domain_tokens = input_ids >= backbone_vocab_size
        inputs_embeds = embedding(input_ids.clamp(max=backbone_vocab_size - 1))
        if not domain_tokens.any():
            return inputs_embeds
        rows_of_id = torch.zeros(self.config.vocab_size - backbone_vocab_size, dtype=torch.long)
        tables, offset = [], 0
        for name, domain in self.domains.items():
            ids = torch.tensor(self.config.domains[name]["token_ids"]) - backbone_vocab_size
            rows_of_id[ids] = torch.arange(offset, offset + len(ids))
            tables.append(domain.token_embeddings)
            offset += len(ids)
        table = torch.cat(tables).to(inputs_embeds.dtype)
        rows = rows_of_id.to(input_ids.device)[(input_ids - backbone_vocab_size).clamp(min=0)]
        return torch.where(domain_tokens[..., None], table[rows], inputs_embeds)

    def _prepare_cache(self, past_key_values):
        """A cache with a layer for every backbone layer and every expansion block (created if None)."""
        backbone_config = self.config.backbone_config
        if past_key_values is None:
            past_key_values = DynamicCache(config=backbone_config)
        num_layers = self.config.num_backbone_layers
        needed = num_layers + len(self._cache_templates)
        if getattr(past_key_values, "layer_class_to_replicate", None) is None and len(past_key_values.layers) < needed:
            # Fresh cache layers of the same kind (full or sliding-window) as the backbone layer each block follows.
            fresh_layers = DynamicCache(config=backbone_config).layers
            for template in self._cache_templates[len(past_key_values.layers) - num_layers :]:
                past_key_values.layers.append(copy.deepcopy(fresh_layers[template]))
        return past_key_values

    def _run_expansion_blocks(self, layer_index: int, layer: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook on backbone layer `layer_index`: run each routed domain's blocks at this depth on its rows."""
        routes = self._active_routes
        if not routes:
            return None
        hidden_states = output[0] if isinstance(output, tuple) else output
        batch_size = hidden_states.shape[0]
        depth = str(layer_index)
        for domain_index, rows in routes.items():
            blocks = self.domains[self.domain_names[domain_index]].blocks
            if depth not in blocks:
                continue
            whole_batch = rows.numel() == batch_size
            if whole_batch:
                domain_hidden, block_args, block_kwargs = hidden_states, args[1:], kwargs
            else:
                domain_hidden = hidden_states.index_select(0, rows)
                block_args = _select_rows(args[1:], rows, batch_size)
                block_kwargs = {key: _select_rows(value, rows, batch_size) for key, value in kwargs.items()}
            for block in blocks[depth]:
                domain_hidden = block(domain_hidden, *block_args, **block_kwargs)
                if isinstance(domain_hidden, tuple):
                    domain_hidden = domain_hidden[0]
            hidden_states = domain_hidden if whole_batch else hidden_states.index_copy(0, rows, domain_hidden)
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

    def _keep_final_hidden_states(self, lm_head: nn.Module, args: tuple) -> None:
        if self._active_routes:
            self._final_hidden_states = args[0]

    def _domain_logits(self, backbone_logits: torch.Tensor, domain_ids: torch.LongTensor) -> torch.Tensor:
        """Logits `(batch, seq, vocab_size - backbone_vocab_size)` of the domain tokens.

        A row's own domain tokens get logits from the domain's output rows; every other domain token (control tokens,
        other domains' tokens) gets `-inf`: a row can never produce it.
        """
        backbone_vocab_size = self.config.backbone_vocab_size
        logits = backbone_logits.new_full(
            (*backbone_logits.shape[:-1], self.config.vocab_size - backbone_vocab_size), float("-inf")
        )
        for domain_index, rows in (self._active_routes or {}).items():
            name = self.domain_names[domain_index]
            weight = self.domains[name].output_weight()
            if weight is None:
                continue
            hidden_states = self._final_hidden_states.index_select(0, rows)
            bias = self.domains[name].output_bias
            own = nn.functional.linear(hidden_states, weight.to(hidden_states.dtype), bias)
            columns = torch.tensor(self.config.domains[name]["token_ids"][1:], device=logits.device) - backbone_vocab_size
            row_logits = logits.index_select(0, rows)
            row_logits[..., columns] = own.to(logits.dtype)
            logits = logits.index_copy(0, rows, row_logits)
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        domain_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> DomainExpertsCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids. Without a cache, or with an empty one, rows are routed from them (see [`route`]).
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                1 for tokens to attend to, 0 for padding (left or right).
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Passed to the backbone as is. With left padding pass `attention_mask.cumsum(-1) - 1` (as `generate` does).
            past_key_values (`Cache`, *optional*): a cache from an earlier call; one is created when `use_cache`.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Instead of `input_ids`; rows then run on the bare backbone unless `domain_ids` says otherwise.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the causal LM loss (shifted inside); -100 and control tokens are ignored.
            domain_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                The route of each row (index in `domain_names`, -1 for the bare backbone), overriding [`route`].

        Returns:
            [`DomainExpertsCausalLMOutputWithPast`] with each row's route in `domain_ids` and `logits` of shape
            `(batch_size, sequence_length, config.vocab_size)`:
            the backbone's logits, then the domain-token columns: a row's own domain tokens from its domain's output
            rows, `-inf` for all others (control tokens and other domains' tokens are never produced).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        use_cache = use_cache if use_cache is not None else self.config.backbone_config.get_text_config(decoder=True).use_cache
        if use_cache or past_key_values is not None:
            past_key_values = self._prepare_cache(past_key_values)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        device = (input_ids if input_ids is not None else inputs_embeds).device

        if domain_ids is None:
            continuing = past_key_values is not None and past_key_values.get_seq_length() > 0
            if continuing and getattr(past_key_values, "domain_ids", None) is not None:
                domain_ids = past_key_values.domain_ids
            elif continuing:
                raise ValueError("Continuing from a cache filled elsewhere: pass domain_ids=model.route(whole_input_ids, mask).")
            elif input_ids is not None:
                domain_ids = self.route(input_ids, attention_mask)
            else:
                domain_ids = torch.full((batch_size,), BASE_ROUTE, dtype=torch.long, device=device)
        domain_ids = domain_ids.to(device)
        if domain_ids.shape != (batch_size,) or domain_ids.min() < BASE_ROUTE or domain_ids.max() >= len(self.domains):
            raise ValueError(f"domain_ids must have shape ({batch_size},) and values in [-1, {len(self.domains)}).")
        if past_key_values is not None:
            past_key_values.domain_ids = domain_ids
        if input_ids is not None:
            self._check_input_ids(input_ids, domain_ids)
            inputs_embeds = self._embed(input_ids)

        kwargs.pop("return_dict", None)  # always a ModelOutput
        self._active_routes = {
            index: (domain_ids == index).nonzero()[:, 0] for index in domain_ids.unique().tolist() if index != BASE_ROUTE
        }
        try:
            outputs = self.backbone(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
            logits = outputs.logits
            if self.config.vocab_size > self.config.backbone_vocab_size:
                logits = torch.cat([logits, self._domain_logits(logits, domain_ids)], dim=-1)
        finally:
            self._active_routes = None
            self._final_hidden_states = None

        loss = None
        if labels is not None:
            # A control token is never a target (its logit is -inf): with left padding it is the first real token.
            is_control = self._control_token_table().to(labels.device) >= 0
            labels = labels.masked_fill(is_control[labels.clamp(0, self.config.vocab_size - 1)], -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return DomainExpertsCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values if use_cache else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            domain_ids=domain_ids,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Generation, tokenization, saving
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `forward` builds the cache itself: it needs layers for the expansion blocks besides the backbone's.
        return False

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # Rows are routed once, on the prompt; later steps keep that route, with or without a cache.
        model_kwargs["domain_ids"] = outputs.domain_ids
        return model_kwargs

    def tokenize(self, text: str | list[str], domain: str | list[str | None] | None = None, **tokenizer_kwargs):
        """Tokenize plain text and route it: the domain's control token goes first (after BOS, if any).

        Control tokens are special tokens that plain text never produces (the tokenizer splits special tokens), so
        text containing `<|domain:NAME|>` does not switch domains; this method is how a caller asks for one.

        Args:
            text: one text or a batch.
            domain: a domain name for every row, one name (or None for the bare backbone) per row, or None.
            tokenizer_kwargs: passed to the tokenizer (`return_tensors` defaults to `"pt"`, `padding` to True).

        Returns:
            `BatchEncoding` with `input_ids` and `attention_mask`.
        """
        self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        domains = self._row_domains(domain, len(texts))
        input_ids: list[list[int]] = [[] for _ in texts]
        for name in dict.fromkeys(domains):  # each domain's rows with its own tokenizer, in one call
            rows = [i for i, row_domain in enumerate(domains) if row_domain == name]
            encoded = self.tokenizer_for(name)(
                [texts[i] for i in rows], split_special_tokens=True, **self._unpadded(tokenizer_kwargs)
            )
            for i, ids in zip(rows, encoded["input_ids"]):
                input_ids[i] = ids
        return self._route_and_pad(input_ids, domains, tokenizer_kwargs)

    def batch_decode(self, sequences, **decode_kwargs) -> list[str]:
        """Decode each row with the tokenizer of the domain it is routed to (see [`route`]).

        Args:
            sequences (`torch.LongTensor` of shape `(batch_size, sequence_length)`): whole sequences, e.g. from
                `generate`, with padding on the left or right.
            decode_kwargs: passed to `tokenizer.decode` (e.g. `skip_special_tokens=True`).
        """
        self._require_tokenizer()
        sequences = torch.as_tensor(sequences)
        pad = self.tokenizer.pad_token_id
        attention_mask = (sequences != pad).long() if pad is not None else None
        routes = self.route(sequences, attention_mask).tolist()
        return [
            self.tokenizer_for(self.domain_names[route] if route >= 0 else None).decode(row, **decode_kwargs)
            for row, route in zip(sequences.tolist(), routes)
        ]

    def apply_chat_template(self, conversations: list[dict] | list[list[dict]], domain=None, **tokenizer_kwargs):
        """Tokenize chat(s) with the tokenizer's chat template, routed like [`tokenize`].

        The template's own special tokens are kept; special tokens inside messages (a control token typed by a user,
        say) are encoded as plain text (`sanitize_control_tokens=True`).
        """
        tokenizer = self._require_tokenizer()
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        split_special_tokens = tokenizer.split_special_tokens
        tokenizer.split_special_tokens = False  # the template writes special tokens as text
        try:
            input_ids = [
                tokenizer.apply_chat_template(chat, sanitize_control_tokens=True, return_dict=True,
                                              **self._unpadded(tokenizer_kwargs))["input_ids"]
                for chat in batch
            ]
        finally:
            tokenizer.split_special_tokens = split_special_tokens
        return self._route_and_pad(input_ids, domain, tokenizer_kwargs)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer: pass one to from_backbone (or set model.tokenizer).")
        return self.tokenizer

    @staticmethod
    def _unpadded(tokenizer_kwargs: dict) -> dict:
        return {k: v for k, v in tokenizer_kwargs.items() if k not in ("return_tensors", "padding", "padding_side")}

    def _row_domains(self, domain, num_rows: int) -> list[str | None]:
        domains = domain if isinstance(domain, list) else [domain] * num_rows
        if len(domains) != num_rows:
            raise ValueError(f"Got {num_rows} rows but {len(domains)} domains.")
        for name in set(domains) - {None}:
            self._check_domain(name)
        return domains

    def _route_and_pad(self, input_ids: list[list[int]], domain, tokenizer_kwargs: dict):
        """Put each row's control token first (after BOS), then pad the batch."""
        domains = self._row_domains(domain, len(input_ids))
        bos = self.tokenizer.bos_token_id
        rows = []
        for ids, name in zip(input_ids, domains):
            if name is not None:
                insert_at = 1 if bos is not None and ids[:1] == [bos] else 0
                ids = ids[:insert_at] + [self.control_token_id(name)] + ids[insert_at:]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return self.tokenizer.pad(
            rows,
            padding=tokenizer_kwargs.get("padding", True),
            padding_side=tokenizer_kwargs.get("padding_side"),
            return_tensors=tokenizer_kwargs.get("return_tensors", "pt"),
        )

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen backbone never trains: keep its dropout off so base rows stay deterministic.
        self.backbone.eval()
        return self

    # Domain packs: the logic lives in `domain_experts.packs`, which the remote-code copy of this file does not have.

    @staticmethod
    def _packs():
        try:
            from domain_experts import packs
        except ImportError as error:
            raise ImportError("Domain pack management needs `pip install domain_experts`.") from error
        return packs

    def save_domain(self, name: str, save_directory: str | os.PathLike, **kwargs):
        """Write domain `name` as a pack folder: manifest, safetensors, tokenizer and model card (written whole, or not
        at all). `kwargs`: `datasets`, `evaluation`, `license`, `repo_id` (see `domain_experts.packs.save_pack`)."""
        return self._packs().save_pack(self, name, save_directory, **kwargs)

    def push_domain_to_hub(self, name: str, repo_id: str, **kwargs):
        """Upload domain `name` as a pack to Hub repo `repo_id` (created if needed) in one commit; returns its
        `CommitInfo`. `kwargs`: `token`, `private`, `revision`, `commit_message`, `datasets`, `evaluation`, ...
        (see `domain_experts.packs.push_pack`)."""
        return self._packs().push_pack(self, name, repo_id, **kwargs)

    def load_domain(self, repo_id_or_path: str | os.PathLike, revision: str | None = None, **kwargs) -> str:
        """Add the domain of a pack (a folder or a Hub repo, at `revision`) and return its name here. The pack must
        fit this backbone (same fingerprint); `name=` loads it under another name. `kwargs`: `name`, `token`,
        `cache_dir`, `force_download`, `local_files_only` (see `domain_experts.packs.load_pack`)."""
        return self._packs().load_pack(self, repo_id_or_path, revision, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the model in one commit: what `save_pretrained` writes (config, weights, remote code, tokenizers) and
        a model card listing the domains (see `domain_experts.packs.push_model_to_hub`)."""
        try:
            packs = self._packs()
        except ImportError:  # the remote-code copy: transformers' own upload, without the model card of the domains
            return super().push_to_hub(repo_id, **kwargs)
        return packs.push_model_to_hub(self, repo_id, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config (with `auto_map`), safetensors weights, the remote-code files and the tokenizers.

        The model's tokenizer goes to `save_directory`, each domain tokenizer to `save_directory/domain_tokenizers/NAME`.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None and kwargs.get("is_main_process", True):
            self.tokenizer.save_pretrained(save_directory)
            for name, tokenizer in self.domain_tokenizers.items():
                tokenizer.save_pretrained(os.path.join(save_directory, DOMAIN_TOKENIZERS_FOLDER, name))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        if loading_info["missing_keys"]:
            # Our `_init_weights` draws nothing, so a missing tensor would silently hold garbage.
            raise ValueError(
                f"{pretrained_model_name_or_path} does not hold every tensor of the model it describes; missing: "
                f"{sorted(loading_info['missing_keys'])[:10]}."
            )
        # Loading materialises fresh parameters, which require grad: freeze the backbone and gate entries again.
        model.backbone.requires_grad_(False)
        for domain in model.domains.values():
            domain.gate_weight.requires_grad_(False)
            domain.gate_bias.requires_grad_(False)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        try:
            # The repo's only code is this model's own files, which the caller already chose to run.
            model.tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=True, **hub_kwargs
            )
        except (OSError, ValueError):
            model.tokenizer = None
            return (model, loading_info) if output_loading_info else model
        for name, settings in model.config.domains.items():
            if len(settings["token_ids"]) > 1:
                model.domain_tokenizers[name] = AutoTokenizer.from_pretrained(
                    pretrained_model_name_or_path, subfolder=f"{DOMAIN_TOKENIZERS_FOLDER}/{name}", **hub_kwargs
                )
        return (model, loading_info) if output_loading_info else model


__all__ = ["DomainExpertsForCausalLM", "DomainExpertsPreTrainedModel"]
