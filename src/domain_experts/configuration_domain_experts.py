# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""DomainExperts model configuration.

This file is copied next to every saved model and loaded with `trust_remote_code=True`, so it imports only
`transformers` and must stay self-contained.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_domain_name(name) -> None:
    """Raise a `ValueError` stating the rule unless `name` is a valid domain name.

    A domain name is 1 to 64 ASCII letters, digits, `_` and `-`, starting with a letter or digit: it names a module
    (no `.`), a folder and a Hub-friendly token, on every file system.
    """
    if not isinstance(name, str) or not _DOMAIN_NAME.fullmatch(name):
        raise ValueError(
            f"Invalid domain name {name!r}: a domain name is 1 to 64 characters, ASCII letters, digits, '_' and '-', "
            "starting with a letter or digit (e.g. 'legal_v2')."
        )


CONTROL_EMBEDDINGS = ("bos", "learned")
"""What a domain's control token reads as: the backbone's BOS token, or a row of the domain's own (see
`DomainExpertsForCausalLM.add_domain`)."""


def check_not_a_file(pretrained_model_name_or_path) -> None:
    """Raise a clear error for a file given where a saved model's folder (or Hub repo id) is expected: transformers
    would take it for a malformed repo id."""
    if os.path.isfile(pretrained_model_name_or_path):
        raise ValueError(f"{pretrained_model_name_or_path} is a file: load the folder that "
                         "`DomainExpertsForCausalLM.save_pretrained` wrote, or a Hub repo id.")


def control_token_for(domain_name: str) -> str:
    """The control token that routes a sequence to `domain_name`, e.g. `<|domain:recipes|>`."""
    return f"<|domain:{domain_name}|>"


@dataclass
class AdapterConfig:
    """Routed low-rank adapters of one domain: a delta `B @ A * scaling` on some of the backbone's linear layers, applied
    to that domain's rows only (the same parameters as peft's `LoraConfig`, for the same method).

    Args:
        r: the rank of each delta.
        alpha: the scaling numerator: `scaling = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`).
        target_modules: the linear layers adapted, by the last part of their name in a decoder layer (`"q_proj"`,
            `"down_proj"`, ...), or `"all-linear"` for every one the architecture table lists for the backbone.
        layers: the backbone layers adapted (default: all).
        use_rslora: rank-stabilised scaling, as in peft.
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = None
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be a positive integer, got {self.r!r}.")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError("AdapterConfig.target_modules must name at least one linear layer (or be 'all-linear').")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown AdapterConfig fields {unknown}; known: {sorted(known)}.")
        return cls(**values)


class DomainExpertsConfig(PretrainedConfig):
    r"""
    Configuration of a [`DomainExpertsForCausalLM`]: a frozen backbone causal LM plus, for each domain, expansion
    blocks, routed low-rank adapters and domain-owned token embeddings.

    Args:
        backbone_config (`dict` or `PretrainedConfig`):
            The configuration of the frozen backbone (any causal LM: Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, ...).
        domains (`dict[str, dict]`, *optional*):
            One entry per domain, in the order the domains were added (the order of their token ids). Each entry holds
            - `"expansion_layers"` (`list[int]`): for every expansion block, the index of the backbone decoder layer
              after which it runs (and of which it is a copy). Repeated indices stack blocks at the same depth.
            - `"token_ids"` (`list[int]`): the ids of the tokens the domain owns; the first is its control token.
            - `"tokens"` (`list[str]`): the strings of those tokens.
            - `"gate"` (`bool`): whether the domain's gate entry is trained (only then may the gate route to it).
            - `"adapters"` (`dict`, *optional*): the domain's routed low-rank adapters, an `AdapterConfig` as a dict,
              with `target_modules` resolved to paths inside a decoder layer and `layers` to a list.
            - `"pack"` (`dict`, *optional*): where the domain was loaded from (a pack's name, repo and revision).
            - `"untied_output"`, `"output_bias"`, `"logit_bias"` (`bool`): whether the domain's own tokens have output
              rows of their own, a bias on them, and a bias on the backbone logits of its rows (all three since
              release 0.2; absent: as the backbone's head, and no logit bias).
            - `"token_init"` (`dict`, *optional*): how the domain's own tokens were started and trained.
            - `"control_embedding"` (`str`, *optional*): what the control token reads as: `"bos"`, the backbone's BOS
              token, or `"learned"` (also when absent, as for domains added before release 0.3), a row of its own.
        vocab_size (`int`, *optional*):
            Size of the id space: the backbone vocabulary plus every id ever given to a domain token. It only grows,
            so the ids of a removed domain are never reused for another one.
        bos_token_id (`int`, *optional*):
            A routing control token may follow this token at the start of a sequence.
        gate_layer (`int`, *optional*):
            The backbone layer whose output hidden states the learned gate reads (mean over the prompt's tokens).
            Defaults to the last layer of the first quarter of the backbone.
        gate_threshold (`float`, *optional*, defaults to 0.5):
            A row without a control token goes to the domain whose gate probability is highest, if that probability
            reaches this threshold; otherwise it runs on the bare backbone.
    """

    model_type = "domain_experts"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    backbone_config: dict | PretrainedConfig | None = None
    domains: dict | None = None
    vocab_size: int | None = None
    gate_layer: int | None = None
    gate_threshold: float = 0.5
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Domains keep the order they were added in, which is the order of their id ranges (config.json sorts keys).
        self.domains = dict(sorted((self.domains or {}).items(), key=lambda item: item[1]["token_ids"][0]))
        backbone_vocab_size = self.backbone_config.get_text_config(decoder=True).vocab_size
        if self.vocab_size is None:
            self.vocab_size = backbone_vocab_size
        if self.gate_layer is None:
            self.gate_layer = max(0, self.num_backbone_layers // 4 - 1)
        if self.vocab_size < backbone_vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the backbone's vocabulary ({backbone_vocab_size})."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """transformers' `get_config_dict`, refusing what is not a saved DomainExperts model.

        transformers reads a folder without `config.json` as an empty config and another model type's config with a
        warning; either would become a default or nonsensical DomainExperts config here, so each is an error naming
        the fix.
        """
        check_not_a_file(pretrained_model_name_or_path)
        config_dict, unused_kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            source = str(pretrained_model_name_or_path)
            found = "holds no config.json" if not config_dict else (
                f"is a {model_type!r} model" if model_type else "has a config.json without a model_type")
            raise ValueError(
                f"{source} {found}, not a saved DomainExperts model. Load a folder written by "
                f"`DomainExpertsForCausalLM.save_pretrained` (or `domain-experts train`/`compose`); to put domains on a "
                f"backbone, start from it with `DomainExpertsForCausalLM.from_backbone(...)`."
            )
        return config_dict, unused_kwargs

    def control_embedding_of(self, name: str) -> str:
        """What domain `name`'s control token reads as: `"bos"` or `"learned"` (a domain added before release 0.3 says
        nothing: its control token has a row of its own)."""
        return self.domains[name].get("control_embedding", "learned")

    @property
    def backbone_vocab_size(self) -> int:
        return self.backbone_config.get_text_config(decoder=True).vocab_size

    @property
    def num_backbone_layers(self) -> int:
        return self.backbone_config.get_text_config(decoder=True).num_hidden_layers


__all__ = ["CONTROL_EMBEDDINGS", "AdapterConfig", "DomainExpertsConfig", "check_domain_name", "control_token_for"]
