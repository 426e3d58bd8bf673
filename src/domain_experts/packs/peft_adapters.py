"""A PEFT LoRA adapter imported as a routed domain: its low-rank deltas applied to that domain's rows only.

peft serves several adapters in one batch only at inference (`adapter_names`), and an adapter there is not a domain
(no control token, no gate, no pack). `load_peft_adapter` reads a LoRA adapter folder or Hub repo (`adapter_config.json`
and `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them), checks that it fits the backbone, and adds
it as a domain whose rows get the logits peft gives for that adapter; the domain then saves and shares as a pack.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file
from transformers.utils import logging

from ..configuration_domain_experts import AdapterConfig, check_domain_name
from ..files import reading_folder
from .hub import check_access, hub_errors, is_local
from .manifest import IncompatibleBackboneError, PackError, library_version


logger = logging.get_logger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# LoRA variants and options a routed adapter does not compute (name -> the value that means "not used").
_UNSUPPORTED_OPTIONS = {
    "use_dora": False, "use_qalora": False, "use_bdlora": None, "lora_bias": False, "bias": "none",
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None, "arrow_config": None,
    "kasa_config": None, "monteclora_config": None, "velora_config": None, "megatron_config": None,
}  # fmt: skip
# Initialisations that change the backbone's weights (the adapter then needs that changed backbone).
_BACKBONE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _read_config(folder: Path, source: str) -> dict[str, Any]:
    try:
        config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PackError(f"{source}: cannot read {ADAPTER_CONFIG_NAME} ({error}).") from error
    if not isinstance(config, dict):
        raise PackError(f"{source}: {ADAPTER_CONFIG_NAME} is not a JSON object.")
    if config.get("peft_type") != "LORA":
        raise PackError(f"{source}: a {config.get('peft_type')!r} adapter; only LoRA adapters import as domains.")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PackError(f"{source}: an adapter for task {config['task_type']!r}; a domain is a causal LM adapter.")
    used = [key for key, unused in _UNSUPPORTED_OPTIONS.items() if config.get(key, unused) not in (unused, None, {}, [])]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BACKBONE_CHANGING_INITS):
        used.append(f"init_lora_weights={init!r} (it changes the backbone's weights)")
    if used:
        raise PackError(f"{source}: the adapter uses {', '.join(used)}, which routed adapters do not support; "
                        "import a plain LoRA adapter (r, lora_alpha, target_modules, use_rslora).")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise PackError(f"{source}: {ADAPTER_CONFIG_NAME} has no valid 'r' and 'lora_alpha'.")
    return config


def _adapter_files(source: str | os.PathLike, revision, token, cache_dir, local_files_only) -> tuple[Path, str]:
    """The folder holding the adapter's config and weights (local, or the Hub cache at one commit), and its name."""
    if is_local(source):
        folder = Path(source)
        if (folder / "adapter_model.bin").is_file() and not (folder / ADAPTER_WEIGHTS_NAME).is_file():
            raise PackError(f"{source} holds adapter_model.bin, a pickle, which is never loaded: save the adapter with "
                            "safetensors (PeftModel.save_pretrained does by default).")
        return folder, str(source)
    repo_id = str(source)
    if not local_files_only:
        check_access(repo_id, revision, token, kind="adapter repo")
    kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
              "library_name": "domain_experts", "library_version": library_version()}
    with hub_errors(repo_id, revision, token, kind="adapter repo"):
        try:
            config_path = Path(hf_hub_download(repo_id, ADAPTER_CONFIG_NAME, **kwargs))
            kwargs["revision"] = config_path.parent.name  # the commit: both files from one version
            hf_hub_download(repo_id, ADAPTER_WEIGHTS_NAME, **kwargs)
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):
                raise
            raise PackError(f"{repo_id} is not a PEFT LoRA adapter saved with safetensors: it lacks "
                            f"{ADAPTER_CONFIG_NAME} or {ADAPTER_WEIGHTS_NAME}.") from error
    return config_path.parent, f"{repo_id}@{config_path.parent.name[:7]}"


def _adapter_state(model, weights: dict[str, torch.Tensor], source: str) -> tuple[list[int], list[str], dict]:
    """The adapted (layer, path) pairs of a peft state dict, as an AdapterConfig's layers and target paths, and the
    tensors keyed as `model.domains[name].adapters` keys them."""
    architecture = model.architecture
    prefix = f"{architecture.decoder}.{architecture.layers}."
    pairs, tensors = set(), {}
    for key, tensor in weights.items():
        name = key.removeprefix("base_model.model.")
        module, _, kind = name.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or not module.startswith(prefix):
            raise PackError(f"{source}: the adapter adapts {module or name}, which is not a linear layer inside a decoder "
                            f"layer; routed adapters adapt {', '.join(architecture.adapter_targets)}.")
        layer, _, path = module.removeprefix(prefix).partition(".")
        if not layer.isdigit() or path not in architecture.adapter_targets:
            raise PackError(f"{source}: the adapter adapts {module}; routed adapters adapt "
                            f"{', '.join(architecture.adapter_targets)} of each decoder layer.")
        pairs.add((int(layer), path))
        tensors[f"adapters.{int(layer)}.{path}.lora_{kind[0]}"] = tensor
    layers = sorted({layer for layer, _ in pairs})
    paths = [path for path in architecture.adapter_targets if any(p == path for _, p in pairs)]
    if pairs != {(layer, path) for layer in layers for path in paths}:
        raise PackError(f"{source}: the adapter adapts other linear layers in different decoder layers; a routed "
                        "adapter adapts the same ones in each of its layers.")
    return layers, paths, tensors


def load_peft_adapter(
    model,
    repo_id_or_path: str | os.PathLike,
    name: str | None = None,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    check_base_model: bool = True,
) -> str:
    """Add a PEFT LoRA adapter (a folder or Hub repo written by `PeftModel.save_pretrained`) to `model` as a domain of
    routed adapters; returns the domain's name. Its rows (control token `<|domain:NAME|>`, or `domain_ids`) get the
    logits the peft model gives; every other row is unchanged, bit for bit.

    Checked before the model changes: a LoRA adapter (no DoRA, bias, modules to save, per-module ranks, or an
    initialisation that changed the backbone), on linear layers the architecture table lists, the same ones in each
    adapted layer, with tensors of the backbone's shapes; and, with `check_base_model`, the adapter's
    `base_model_name_or_path` equal to the backbone's name when both are known.

    Args:
        model: the `DomainExpertsForCausalLM` to add the domain to.
        repo_id_or_path: the adapter's folder or Hub repo.
        name: the domain's name (default: the folder's or repo's last part, made a valid name).
        revision: a branch or commit of the repo.
        token, cache_dir, local_files_only: as for `huggingface_hub.hf_hub_download`.
        check_base_model: refuse an adapter whose recorded base model is another model than the backbone's.
    """
    if name is None:
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(str(repo_id_or_path)).name)[:64].lstrip("_-")
    check_domain_name(name)
    if name in model.domains:
        raise ValueError(f"This model already has a domain named {name!r}; pass name=... to import the adapter under "
                         "another name.")
    folder, source = _adapter_files(repo_id_or_path, revision, token, cache_dir, local_files_only)
    # A local folder is read under its writers' lock; the Hugging Face cache holds immutable snapshots.
    with reading_folder(folder) if folder == Path(repo_id_or_path) else nullcontext():
        config = _read_config(folder, source)
        base = config.get("base_model_name_or_path")
        backbone_name = model.backbone.config.name_or_path
        if check_base_model and base and backbone_name and base != backbone_name:
            raise IncompatibleBackboneError(
                f"{source} is a LoRA adapter of {base!r}, but this model's backbone is {backbone_name!r}. Import it on "
                "its base model, or pass check_base_model=False if the backbone holds the very same weights."
            )
        weights_path = folder / ADAPTER_WEIGHTS_NAME
        if not weights_path.is_file():
            raise PackError(f"{source} has no {ADAPTER_WEIGHTS_NAME}.")
        try:
            weights = load_file(weights_path)
        except Exception as error:  # noqa: BLE001  (safetensors raises its own error types for a malformed file)
            raise PackError(f"{source}: {ADAPTER_WEIGHTS_NAME} is not a valid safetensors file ({error}).") from error
    layers, paths, tensors = _adapter_state(model, weights, source)
    adapters = AdapterConfig(r=config["r"], alpha=config["lora_alpha"], target_modules=paths, layers=layers,
                             use_rslora=bool(config.get("use_rslora", False)))
    specs = model.domain_state_specs([], 0, adapters)
    problems = [f"{key} is {tuple(tensor.shape)}, expected {specs[key][1]}" for key, tensor in tensors.items()
                if tuple(tensor.shape) != specs[key][1]]
    if problems:
        raise IncompatibleBackboneError(f"{source} does not fit this backbone's layers: {'; '.join(problems[:5])}.")
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise PackError(f"{source}: tensor {key} holds NaN or infinite values; refusing the adapter.")
    model.add_domain(name, num_blocks=0, adapters=adapters, provenance={"name": name, "peft_adapter": str(source)})
    with torch.no_grad():
        adapter_modules = model.domains[name]
        for key, tensor in tensors.items():
            adapter_modules.get_parameter(key).copy_(tensor)
    logger.info(f"Imported the LoRA adapter {source} as domain {name!r} (rank {adapters.r}, {len(paths)} projections of "
                f"{len(layers)} layers).")
    return name


__all__ = ["load_peft_adapter"]
