# Copyright 2026 The domain_experts authors. Licensed under the Apache License, Version 2.0.
"""Domain packs: one domain of a `DomainExpertsForCausalLM`, shared on its own, as a folder or a Hugging Face Hub repo.

A pack holds everything a domain adds to a frozen backbone and nothing else:

    domain_pack.json            the manifest (`PackManifest`): format version, the backbone (repo id, revision and a
                                fingerprint of its config and weights), block placement, tokens, gate entry, the name,
                                shape and dtype of every tensor, and the size and sha256 of every other file
    domain_pack.safetensors     the domain's tensors, keyed as in `model.domains[name].state_dict()`
    tokenizer.json, ...         the domain's tokenizer: the backbone's, plus the domain's own tokens (if any) at the ids
                                right after the backbone vocabulary (no control token: its id and name are the model's)
    README.md                   the model card, rendered from `model_cards/domain_pack.md` (not hashed: it may be edited)

Token ids are local to a model (each domain gets the next free range), so a pack stores token strings and the model
that loads it gives them fresh ids. A pack loads only on a backbone with the same fingerprint: the sha256 of the
backbone's canonical config and of all its tensors. Loading never runs code and never unpickles: the manifest is JSON,
the tensors are safetensors, the tokenizer is rebuilt from the loading model's own backbone tokenizer and the pack's
declared tokens (its files must match that rebuild), and everything is checked before anything is attached.
Downloads go through `huggingface_hub` (its cache, revisions, offline mode, tokens), with access asked of the Hub
first (see `hub`).

The subpackage, one concern per module: `manifest` (the manifest, fingerprints, file and tensor checks), `hub`
(downloads, access, uploads), `save_load` (a model's domain to a pack and back), `cards` (model cards),
`peft_adapters` (a PEFT LoRA adapter imported as a domain of routed adapters). The model
methods `save_domain`, `push_domain_to_hub`, `load_domain`, `push_to_hub` and
`DomainExpertsForCausalLM.from_backbone(..., domains=[...])` call these functions.
"""

from .cards import render_model_card, render_pack_card, write_model_card
from .hub import download_pack, is_pack, pull_pack, push_model_to_hub, push_pack_folder, read_pack_manifest
from .manifest import (
    MANIFEST_NAME,
    PACK_FORMAT_VERSION,
    WEIGHTS_NAME,
    BackboneInfo,
    IncompatibleBackboneError,
    PackAccessError,
    PackError,
    PackManifest,
    TensorSpec,
    backbone_info,
    verify_pack_files,
)
from .peft_adapters import load_peft_adapter
from .save_load import load_pack, load_packs, parse_pack_spec, push_pack, save_pack


__all__ = [
    "MANIFEST_NAME",
    "PACK_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "BackboneInfo",
    "IncompatibleBackboneError",
    "PackAccessError",
    "PackError",
    "PackManifest",
    "TensorSpec",
    "backbone_info",
    "download_pack",
    "is_pack",
    "load_pack",
    "load_packs",
    "load_peft_adapter",
    "parse_pack_spec",
    "pull_pack",
    "push_model_to_hub",
    "push_pack",
    "push_pack_folder",
    "read_pack_manifest",
    "render_model_card",
    "render_pack_card",
    "save_pack",
    "verify_pack_files",
    "write_model_card",
]
