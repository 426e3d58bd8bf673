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
the tensors are safetensors, and both are checked against each other and against what the model expects before
anything is attached. Downloads go through `huggingface_hub` (its cache, revisions, offline mode, tokens); a file whose
sha256 differs from the manifest is removed from the cache before the error is raised, so that a retry downloads it again.

The model methods `save_domain`, `push_domain_to_hub`, `load_domain`, `push_to_hub` and
`DomainExpertsForCausalLM.from_backbone(..., domains=[...])` call the functions of this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    scan_cache_dir,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging

from .configuration_domain_experts import control_token_for
from .tokenization_domain_experts import new_tokens_of, rebuild_tokenizer


if TYPE_CHECKING:
    from .modeling_domain_experts import DomainExpertsForCausalLM


logger = logging.get_logger(__name__)

PACK_FORMAT = "domain_experts.pack"
PACK_FORMAT_VERSION = 1
MANIFEST_NAME = "domain_pack.json"
WEIGHTS_NAME = "domain_pack.safetensors"
README_NAME = "README.md"
LIBRARY_NAME = "domain_experts"

# Files a pack may hold besides the manifest and the weights: tokenizer files, which are data (no pickle, no code).
_DATA_SUFFIXES = (".json", ".txt", ".jinja", ".model")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# safetensors dtype codes -> torch dtype names, as the manifest writes them.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip

# Config fields that say how a backbone was loaded or serialized, not what it computes: left out of its fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version", "_name_or_path", "name_or_path", "_commit_hash", "architectures", "dtype",
        "torch_dtype", "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
        "_attn_implementation_internal", "_experts_implementation", "use_cache", "output_attentions",
        "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    }
)  # fmt: skip


class PackError(ValueError):
    """A pack that is malformed, corrupted, or does not fit the model it is loaded into."""


class IncompatibleBackboneError(PackError):
    """A pack made for another backbone (or for other weights of the same one)."""


class PackAccessError(OSError):
    """The Hub refused access to a pack or model repo: it does not exist, it is private, or the token is invalid."""


# ----------------------------------------------------------------------------------------------------------------
# Backbone fingerprints
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneInfo:
    """Which backbone a pack was made for. The two sha256 digests decide compatibility; the rest is informative.

    Attributes:
        config_sha256: sha256 of the backbone config's canonical JSON, without fields that do not change what it
            computes (`transformers_version`, `_name_or_path`, `dtype`, attention implementation, ...).
        weights_sha256: sha256 over every tensor of the backbone's `state_dict` (key, dtype, shape and bytes), in order.
        model_type: the config's `model_type`.
        name_or_path: the repo id or path the backbone was loaded from, when known.
        revision: the commit it was loaded at, when known.
    """

    config_sha256: str
    weights_sha256: str
    model_type: str
    name_or_path: str | None = None
    revision: str | None = None

    @property
    def short_fingerprint(self) -> str:
        return f"config {self.config_sha256[:8]}, weights {self.weights_sha256[:8]}"

    def describe(self) -> str:
        """E.g. `HuggingFaceTB/SmolLM2-135M@1a2b3c4 (fingerprint: config 0f1e2d3c, weights 4b5a6978)`."""
        name = self.name_or_path or f"an unnamed {self.model_type} backbone"
        revision = f"@{self.revision[:7]}" if self.revision else ""
        return f"{name}{revision} (fingerprint: {self.short_fingerprint})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "model_type": self.model_type,
            "config_sha256": self.config_sha256,
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BackboneInfo:
        _check(isinstance(data, dict), "backbone", "an object", data)
        for key in ("config_sha256", "weights_sha256"):
            _check(isinstance(data.get(key), str) and _SHA256.match(data[key]), f"backbone.{key}", "a sha256 hex digest", data.get(key))
        _check(isinstance(data.get("model_type"), str), "backbone.model_type", "a string", data.get("model_type"))
        for key in ("name_or_path", "revision"):
            _check(data.get(key) is None or isinstance(data[key], str), f"backbone.{key}", "a string or null", data.get(key))
        return cls(data["config_sha256"], data["weights_sha256"], data["model_type"], data.get("name_or_path") or None,
                   data.get("revision") or None)


def _canonical_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical_config(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_canonical_config(v) for v in value]
    return value


# backbone module -> (signature of its tensors, weights sha256); the signature changes when any tensor is replaced or
# modified in place (tensor versions count in-place writes), so a cached digest is never stale.
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _weights_sha256(backbone: nn.Module) -> str:
    state = backbone.state_dict()
    signature = tuple(
        (key, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for key, t in state.items()
    )
    cached = _WEIGHT_DIGESTS.get(backbone)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hashlib.sha256()
    for key, tensor in state.items():
        tensor = tensor.detach()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    _WEIGHT_DIGESTS[backbone] = (signature, digest.hexdigest())
    return digest.hexdigest()


def backbone_info(model_or_backbone: nn.Module) -> BackboneInfo:
    """The fingerprint and origin of a backbone (or of the backbone of a `DomainExpertsForCausalLM`).

    The weights digest hashes every tensor once (about a second for a 135M-parameter model on CPU) and is cached until a
    tensor changes.
    """
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    config = backbone.config
    canonical = json.dumps(_canonical_config(config.to_dict()), sort_keys=True, separators=(",", ":"), default=str)
    return BackboneInfo(
        config_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        weights_sha256=_weights_sha256(backbone),
        model_type=config.model_type,
        name_or_path=config.name_or_path or None,
        revision=getattr(config, "_commit_hash", None) or None,
    )


# ----------------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """What the manifest says of one tensor: its dtype (a torch dtype name, e.g. `float32`) and shape."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class PackManifest:
    """The contents of `domain_pack.json`.

    Attributes:
        name: the domain's name (the control token is `<|domain:NAME|>`); a model may load it under another name.
        backbone: the backbone the pack was made for.
        expansion_layers: for each expansion block, the backbone layer it follows.
        tokens: the domain's own tokens (strings, in the order of its token embedding rows 1...), without the control
            token; empty when the domain uses the backbone's tokenizer.
        gate_trained: whether the domain's entry in the learned gate is trained.
        gate_layer: the backbone layer whose hidden states the gate entry reads.
        tensors: name -> `TensorSpec` of every tensor in `domain_pack.safetensors`.
        files: path -> `{"sha256": ..., "size": ...}` of every file of the pack but the manifest and the model card.
        datasets: datasets the domain was trained on (Hub ids or names), for the model card.
        evaluation: `{"dataset": ..., "split": ..., "metrics": {name: value}}`, for the model card, or None.
        library_version: the `domain_experts` version that wrote the pack.
        format_version: the pack format version (readers refuse newer ones).
    """

    name: str
    backbone: BackboneInfo
    expansion_layers: list[int]
    tokens: list[str]
    gate_trained: bool
    gate_layer: int
    tensors: dict[str, TensorSpec]
    files: dict[str, dict[str, Any]]
    datasets: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    library_version: str | None = None
    format_version: int = PACK_FORMAT_VERSION

    @property
    def control_token(self) -> str:
        return control_token_for(self.name)

    @property
    def num_parameters(self) -> int:
        total = 0
        for spec in self.tensors.values():
            count = 1
            for size in spec.shape:
                count *= size
            total += count
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PACK_FORMAT,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "name": self.name,
            "backbone": self.backbone.to_dict(),
            "expansion_layers": list(self.expansion_layers),
            "tokens": list(self.tokens),
            "gate": {"trained": self.gate_trained, "layer": self.gate_layer},
            "tensors": {key: {"dtype": spec.dtype, "shape": list(spec.shape)} for key, spec in self.tensors.items()},
            "files": {path: dict(entry) for path, entry in self.files.items()},
            "datasets": list(self.datasets),
            "evaluation": self.evaluation,
        }

    @classmethod
    def from_dict(cls, data: Any) -> PackManifest:
        """Validate a decoded `domain_pack.json`; raises `PackError` naming the first field that is wrong."""
        _check(isinstance(data, dict) and data.get("format") == PACK_FORMAT, "format", repr(PACK_FORMAT),
               data.get("format") if isinstance(data, dict) else data)
        version = data.get("format_version")
        _check(isinstance(version, int) and not isinstance(version, bool) and version >= 1, "format_version",
               "a positive integer", version)
        if version > PACK_FORMAT_VERSION:
            raise PackError(
                f"This pack has format version {version}; this domain_experts reads up to version "
                f"{PACK_FORMAT_VERSION}. Upgrade domain_experts to load it."
            )
        name = data.get("name")
        _check(isinstance(name, str) and _valid_domain_name(name), "name", "a domain name (letters, digits, _-.)", name)
        layers = data.get("expansion_layers")
        _check(isinstance(layers, list) and layers and all(_is_index(i) for i in layers), "expansion_layers",
               "a non-empty list of layer indices", layers)
        tokens = data.get("tokens")
        _check(isinstance(tokens, list) and all(isinstance(t, str) and t for t in tokens)
               and len(set(tokens)) == len(tokens), "tokens", "a list of distinct non-empty strings", tokens)
        gate = data.get("gate")
        _check(isinstance(gate, dict) and isinstance(gate.get("trained"), bool) and _is_index(gate.get("layer")),
               "gate", 'an object {"trained": bool, "layer": int}', gate)
        tensors = data.get("tensors")
        _check(isinstance(tensors, dict) and tensors, "tensors", "a non-empty object", tensors)
        specs = {}
        for key, spec in tensors.items():
            _check(isinstance(spec, dict) and spec.get("dtype") in _SAFETENSORS_DTYPES.values()
                   and isinstance(spec.get("shape"), list) and all(_is_index(s) for s in spec["shape"]),
                   f"tensors.{key}", 'an object {"dtype": torch dtype name, "shape": [int, ...]}', spec)
            specs[key] = TensorSpec(spec["dtype"], tuple(spec["shape"]))
        files = data.get("files")
        _check(isinstance(files, dict) and WEIGHTS_NAME in files, "files", f"an object listing {WEIGHTS_NAME}", files)
        for path, entry in files.items():
            _check(_is_data_file(path), f"files.{path}", f"{WEIGHTS_NAME} or a data file ({', '.join(_DATA_SUFFIXES)})"
                   " at a relative path", path)
            _check(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                   and _is_index(entry.get("size")), f"files.{path}", 'an object {"sha256": hex, "size": int}', entry)
        datasets = data.get("datasets") or []
        _check(isinstance(datasets, list) and all(isinstance(d, str) for d in datasets), "datasets",
               "a list of strings", datasets)
        evaluation = data.get("evaluation")
        _check(evaluation is None or _valid_evaluation(evaluation), "evaluation",
               'null or {"dataset": str, "split": str, "metrics": {name: number}}', evaluation)
        library_version = data.get("library_version")
        return cls(
            name=name,
            backbone=BackboneInfo.from_dict(data.get("backbone")),
            expansion_layers=[int(i) for i in layers],
            tokens=list(tokens),
            gate_trained=gate["trained"],
            gate_layer=int(gate["layer"]),
            tensors=specs,
            files={path: {"sha256": entry["sha256"], "size": int(entry["size"])} for path, entry in files.items()},
            datasets=list(datasets),
            evaluation=evaluation,
            library_version=library_version if isinstance(library_version, str) else None,
            format_version=version,
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> PackManifest:
        """Read and validate `folder/domain_pack.json`."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise PackError(f"{folder} is not a domain pack: it has no {MANIFEST_NAME}.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PackError(f"{path} is not valid JSON ({error}).") from error
        return cls.from_dict(data)


def _check(condition: Any, field_name: str, expected: str, got: Any) -> None:
    if not condition:
        shown = repr(got)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise PackError(f"Invalid {MANIFEST_NAME}: {field_name!r} must be {expected}, got {shown}.")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_domain_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-." for c in name)


def _is_data_file(path: Any) -> bool:
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or any(part in (".", "..") for part in path.split("/")):
        return False
    if path in (MANIFEST_NAME, README_NAME):
        return False
    return path == WEIGHTS_NAME or path.endswith(_DATA_SUFFIXES)


def _valid_evaluation(evaluation: Any) -> bool:
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict) or not evaluation["metrics"]:
        return False
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in evaluation["metrics"].values())
    texts = all(isinstance(evaluation.get(k, ""), str) for k in ("dataset", "split", "task"))
    return numbers and texts and all(isinstance(k, str) for k in evaluation["metrics"])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_specs(state_dict: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {key: TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for key, t in state_dict.items()}


def _spec_differences(expected: dict[str, TensorSpec], got: dict[str, TensorSpec], limit: int = 5) -> list[str]:
    """Human-readable differences between two tensor listings (empty when they agree exactly)."""
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    changed = [key for key in expected.keys() & got.keys() if expected[key] != got[key]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:limit])}")
    for key in sorted(changed)[:limit]:
        problems.append(f"{key} is {got[key]}, expected {expected[key]}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def _pack_tokenizer(model: DomainExpertsForCausalLM, name: str):
    """The domain's tokenizer as a pack stores it: the backbone's, plus the domain's own tokens right after the
    backbone vocabulary. No control token (its id and name belong to the model that loads the pack)."""
    if model.tokenizer is None:
        return None
    tokens = model.config.domains[name]["tokens"][1:]
    if not tokens:
        return model._backbone_tokenizer()
    own = model.domain_tokenizers[name]
    vocab_size = model.config.backbone_vocab_size
    data = json.loads(own.backend_tokenizer.to_str())
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < vocab_size}
    vocab.update({token: vocab_size + row for row, token in enumerate(tokens)})
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    tokenizer = rebuild_tokenizer(own, data)
    tokenizer.split_special_tokens = False  # a standalone domain tokenizer, as `extend_tokenizer` makes them
    tokenizer.init_kwargs["split_special_tokens"] = False
    return tokenizer


def _library_version() -> str:
    from . import __version__

    return __version__


def save_pack(
    model: DomainExpertsForCausalLM,
    name: str,
    save_directory: str | os.PathLike,
    *,
    datasets: list[str] | None = None,
    evaluation: dict[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write domain `name` of `model` as a pack folder (see the module docstring for its files).

    The folder is written next to `save_directory` and renamed into place once complete: an existing pack there is
    replaced whole, and an error leaves whatever was there untouched. A folder that holds anything but a pack is refused.

    Args:
        model: the model holding the domain.
        name: the domain.
        save_directory: the pack folder to write.
        datasets: what the domain was trained on (Hub dataset ids or names), for the model card's metadata.
        evaluation: `{"dataset": "recipes", "split": "test", "metrics": {"perplexity": 4.2}}`, for the model card.
        license: a license id for the model card's metadata (e.g. `apache-2.0`).
        repo_id: the Hub repo the pack is meant for, shown in the model card's usage snippet.

    Returns:
        The pack folder.
    """
    model._check_domain(name)
    if evaluation is not None and not _valid_evaluation(evaluation):
        raise ValueError(
            'evaluation must look like {"dataset": "recipes", "split": "test", "metrics": {"perplexity": 4.2}} '
            f"(metric values are numbers), got {evaluation!r}."
        )
    settings = model.config.domains[name]
    if len(settings["tokens"]) > 1 and model.tokenizer is None:
        raise ValueError(f"Domain {name!r} has tokens of its own, but the model has no tokenizer to save them with: "
                         "set model.tokenizer to the backbone's tokenizer (or load the model with its tokenizer).")
    state_dict = {key: t.detach().cpu().contiguous() for key, t in model.domains[name].state_dict().items()}
    tokenizer = _pack_tokenizer(model, name)

    def write(folder: Path) -> None:
        # One metadata key: safetensors writes several in a random order, and a pack's bytes must not vary.
        save_file(state_dict, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            if not _is_data_file(relative):
                raise RuntimeError(f"Unexpected file {relative} in a pack being written.")
            files[relative] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
        manifest = PackManifest(
            name=name,
            backbone=backbone_info(model),
            expansion_layers=list(settings["expansion_layers"]),
            tokens=list(settings["tokens"][1:]),
            gate_trained=bool(settings.get("gate", False)),
            gate_layer=int(model.config.gate_layer),
            tensors=_tensor_specs(state_dict),
            files=files,
            datasets=list(datasets or []),
            evaluation=evaluation,
            library_version=_library_version(),
        )
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        render_pack_card(manifest, repo_id=repo_id, license=license).save(folder / README_NAME)

    target = write_folder_atomically(save_directory, write, replaceable=MANIFEST_NAME)
    logger.info(f"Saved domain {name!r} as a pack in {target}.")
    return target


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None], replaceable: str) -> Path:
    """Run `write` on a fresh folder beside `target`, then rename it to `target`.

    An existing `target` is replaced only if it is empty or holds `replaceable` (a pack, or a saved model): a folder of
    other files is never deleted. The old folder is removed only once the new one is in place.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder.")
        if any(target.iterdir()) and not (target / replaceable).is_file():
            raise FileExistsError(f"{target} is not empty and holds no {replaceable}: refusing to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        write(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            target.rename(old)
            try:
                staging.rename(target)
            except BaseException:
                old.rename(target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------


def _template(name: str) -> str:
    """A model card template from `model_cards/` (the repo's top-level folder, shipped in the package as a link)."""
    return (resources.files(__package__) / "model_cards" / name).read_text(encoding="utf-8")


def _hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a Hub repo (not a local folder), else None."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def _backbone_link(backbone: BackboneInfo) -> str:
    hub_id = _hub_model_id(backbone.name_or_path)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if backbone.name_or_path:
        return f"`{backbone.name_or_path}`"
    return f"(an unnamed `{backbone.model_type}` model)"


def render_pack_card(manifest: PackManifest, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """The model card of a pack: `model_cards/domain_pack.md` with Hub metadata (library, base model, tags, datasets,
    and `model-index` results when the manifest holds an evaluation)."""
    backbone_id = _hub_model_id(manifest.backbone.name_or_path)
    evaluation = manifest.evaluation
    eval_results = None
    if evaluation:
        dataset = evaluation.get("dataset") or manifest.name
        eval_results = [
            EvalResult(task_type=evaluation.get("task", "text-generation"), dataset_type=dataset, dataset_name=dataset,
                       dataset_split=evaluation.get("split") or None, metric_type=metric, metric_name=metric,
                       metric_value=value)
            for metric, value in evaluation["metrics"].items()
        ]
    title = repo_id.split("/")[-1] if repo_id else f"{manifest.name} domain pack"
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=backbone_id,
        tags=["domain-experts", "knowledge-expansion", manifest.name],
        datasets=manifest.datasets or None,
        metrics=list(evaluation["metrics"]) if evaluation else None,
        eval_results=eval_results,
        model_name=title,
        license=license,
        pipeline_tag="text-generation",
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template("domain_pack.md"),
        title=title,
        name=manifest.name,
        repo_id=repo_id,
        backbone_id=backbone_id or manifest.backbone.name_or_path,
        backbone_link=_backbone_link(manifest.backbone),
        backbone_model_type=manifest.backbone.model_type,
        backbone_revision=manifest.backbone.revision,
        config_sha256=manifest.backbone.config_sha256,
        weights_sha256=manifest.backbone.weights_sha256,
        num_blocks=len(manifest.expansion_layers),
        expansion_layers=manifest.expansion_layers,
        control_token=manifest.control_token,
        num_tokens=len(manifest.tokens),
        num_parameters=manifest.num_parameters,
        gate_trained=manifest.gate_trained,
        gate_layer=manifest.gate_layer,
        datasets=manifest.datasets,
        evaluation=evaluation,
        format_version=manifest.format_version,
        tokenizer_files=[path for path in manifest.files if path != WEIGHTS_NAME],
        library_version=manifest.library_version or _library_version(),
    )


def render_model_card(
    model: DomainExpertsForCausalLM, repo_id: str | None = None, tags: list[str] | None = None
) -> ModelCard:
    """The model card of a composed model: `model_cards/composed_model.md`, listing each domain and where it came from."""
    backbone = backbone_info(model)
    backbone_id = _hub_model_id(backbone.name_or_path)
    domains = []
    for name, settings in model.config.domains.items():
        pack = settings.get("pack")
        if pack and pack.get("repo_id"):
            revision = f"@{pack['revision'][:7]}" if pack.get("revision") else ""
            source = f"[{pack['repo_id']}{revision}](https://huggingface.co/{pack['repo_id']})"
        else:
            source = "trained in this model" if not pack else "a local pack"
        domains.append({
            "name": name,
            "control_token": settings["tokens"][0],
            "expansion_layers": settings["expansion_layers"],
            "num_tokens": len(settings["tokens"]) - 1,
            "gate": settings.get("gate", False),
            "source": source,
        })
    title = repo_id.split("/")[-1] if repo_id else "DomainExperts model"
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=backbone_id,
        tags=list(dict.fromkeys(["domain-experts", "knowledge-expansion", *model.config.domains, *(tags or [])])),
        model_name=title,
        pipeline_tag="text-generation",
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template("composed_model.md"),
        title=title,
        repo_id=repo_id,
        backbone_link=_backbone_link(backbone),
        domains=domains,
        library_version=_library_version(),
    )


def write_model_card(
    model: DomainExpertsForCausalLM,
    save_directory: str | os.PathLike,
    repo_id: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write the composed model's card as `save_directory/README.md` (next to what `save_pretrained` wrote)."""
    path = Path(save_directory) / README_NAME
    render_model_card(model, repo_id=repo_id, tags=tags).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading, verifying and downloading
# ----------------------------------------------------------------------------------------------------------------


def verify_pack_files(folder: str | os.PathLike, manifest: PackManifest) -> list[str]:
    """The files of `folder` whose size or sha256 differs from the manifest (a missing file counts), in manifest order."""
    bad = []
    for path, entry in manifest.files.items():
        file = Path(folder) / path
        if not file.is_file() or file.stat().st_size != entry["size"] or _sha256_file(file) != entry["sha256"]:
            bad.append(path)
    return bad


def _check_weights_header(folder: Path, manifest: PackManifest, source: str) -> None:
    """The safetensors file must hold exactly the tensors the manifest lists, with the same dtypes and shapes."""
    try:
        with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights:
            found = {}
            for key in weights.keys():
                tensor = weights.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                found[key] = TensorSpec(dtype, tuple(tensor.get_shape()))
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types for a malformed file)
        raise PackError(f"{source}: {WEIGHTS_NAME} is not a valid safetensors file ({error}).") from error
    problems = _spec_differences(manifest.tensors, found)
    if problems:
        raise PackError(f"{source}: {WEIGHTS_NAME} does not match its manifest: " + "; ".join(problems) + ".")


def _check_tokenizer_files(folder: Path, manifest: PackManifest, source: str) -> None:
    config_path = folder / "tokenizer_config.json"
    if "tokenizer_config.json" in manifest.files and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get("auto_map"):
            raise PackError(f"{source}: its tokenizer asks for custom code (auto_map); a pack never brings code.")


def _source_name(repo_id: str | None, revision: str | None, folder: Path) -> str:
    if repo_id is None:
        return str(folder)
    return f"{repo_id}@{revision[:7]}" if revision else repo_id


@dataclass
class _FetchedPack:
    """A pack's manifest, and how to get the rest of it (from a local folder, or from the Hub at one commit)."""

    manifest: PackManifest
    folder: Path
    repo_id: str | None = None
    commit: str | None = None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return _source_name(self.repo_id, self.commit, self.folder)

    def fetch_files(self) -> Path:
        """Make every file of the manifest present in `folder` and check it; returns `folder`."""
        if self.repo_id is not None:
            paths = []
            with _hub_errors(self.repo_id, self.commit, self.hub_kwargs.get("token")):
                for path in self.manifest.files:
                    try:
                        paths.append(hf_hub_download(self.repo_id, path, revision=self.commit, **self.hub_kwargs))
                    except EntryNotFoundError as error:
                        if isinstance(error, LocalEntryNotFoundError):
                            raise
                        raise PackError(f"{self.source}: its manifest lists {path}, which the repo does not hold.") from error
            bad = verify_pack_files(self.folder, self.manifest)
            if bad:
                _evict_from_cache(self.repo_id, [p for p, name in zip(paths, self.manifest.files) if name in bad],
                                  self.hub_kwargs.get("cache_dir"))
                raise PackError(
                    f"{self.source}: the download of {', '.join(bad)} does not match the sha256 in the pack's manifest "
                    "(corrupted in transit or in storage). The bad files were removed from the Hugging Face cache; "
                    "try again."
                )
        else:
            bad = verify_pack_files(self.folder, self.manifest)
            if bad:
                raise PackError(
                    f"{self.source}: {', '.join(bad)} differ from the size or sha256 in its manifest (missing, "
                    "modified or corrupted files)."
                )
        _check_weights_header(self.folder, self.manifest, self.source)
        _check_tokenizer_files(self.folder, self.manifest, self.source)
        return self.folder


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: Any, kind: str = "pack repo") -> Iterator[None]:
    """Turn `huggingface_hub` errors into messages that say what to do."""
    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except LocalEntryNotFoundError as error:
        raise OSError(
            f"Pack {repo_id}{at} is not in the Hugging Face cache, and the Hub cannot be reached (offline mode "
            f"HF_HUB_OFFLINE=1, or no network). Load it once online; later loads work offline. ({error})"
        ) from error
    except RepositoryNotFoundError as error:
        local = f" (and there is no local folder {repo_id!r})" if not os.path.isabs(repo_id) else ""
        raise PackAccessError(
            f"Cannot access {kind} {repo_id!r}{local}: it does not exist, or it is private and "
            + ("the token passed has no access to it" if token else "no token was passed")
            + ". Pass token=... (--token) or log in with `hf auth login`."
        ) from error
    except RevisionNotFoundError as error:
        raise PackError(f"{kind.capitalize()} {repo_id!r} has no revision {revision!r}.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PackAccessError(
                f"The Hub refused access to {repo_id!r} (HTTP {status}: {error.server_message or error}): the token "
                "is invalid or has no access to this repo. Pass a valid token=... (--token) or log in with "
                "`hf auth login`."
            ) from error
        raise


def _evict_from_cache(repo_id: str, snapshot_paths: list[str], cache_dir: str | os.PathLike | None) -> None:
    """Remove files from the Hugging Face cache: every cached revision of `repo_id` that holds one of their blobs.

    `huggingface_hub` checks only the size of a download, so a corrupted file of the right size lands in the cache and
    would be served again by every later call (offline or pinned ones too). Deleting the revisions that point to the bad
    blobs (through the public cache API) makes the next call download them again.
    """
    bad_blobs = {Path(os.path.realpath(path)) for path in snapshot_paths}
    cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    revisions = [
        revision.commit_hash
        for repo in cache.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for revision in repo.revisions
        if any(file.blob_path in bad_blobs for file in revision.files)
    ]
    if revisions:
        cache.delete_revisions(*revisions).execute()
        logger.warning(f"Removed cached revision(s) {', '.join(r[:7] for r in revisions)} of {repo_id}: corrupted files.")


def _is_local(source: str | os.PathLike) -> bool:
    path = Path(source)
    if path.is_dir():
        return True
    if path.exists():
        raise PackError(f"{source} is a file; a pack is a folder (holding {MANIFEST_NAME}) or a Hub repo id.")
    try:
        validate_repo_id(str(source))
    except HFValidationError as error:
        raise FileNotFoundError(f"{source} is neither a pack folder nor a Hub repo id ({error}).") from error
    return False


def _fetch_manifest(
    source: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> _FetchedPack:
    if _is_local(source):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {source} is a local folder.")
        return _FetchedPack(PackManifest.from_folder(source), Path(source))
    repo_id = str(source)
    hub_kwargs = {"token": token, "cache_dir": cache_dir, "force_download": force_download,
                  "local_files_only": local_files_only, "library_name": LIBRARY_NAME,
                  "library_version": _library_version()}
    with _hub_errors(repo_id, revision, token):
        try:
            path = hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, **hub_kwargs)
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):
                raise
            at = f" at revision {revision!r}" if revision else ""
            raise PackError(f"{repo_id}{at} is not a domain pack: it has no {MANIFEST_NAME}.") from error
    folder = Path(path).parent
    commit = folder.name if _COMMIT.match(folder.name) else revision
    try:
        manifest = PackManifest.from_folder(folder)
    except PackError:
        # Most likely a corrupted download (the Hub client checks sizes only): never serve it from the cache again.
        _evict_from_cache(repo_id, [path], cache_dir)
        raise
    return _FetchedPack(manifest, folder, repo_id, commit, hub_kwargs)


def read_pack_manifest(
    source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None, **hub_kwargs
) -> PackManifest:
    """The manifest of a pack folder or Hub repo (downloads only `domain_pack.json`)."""
    return _fetch_manifest(source, revision=revision, token=token, **hub_kwargs).manifest


def is_pack(source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None) -> bool:
    """Whether `source` (a folder or a Hub repo) holds a domain pack manifest."""
    if Path(source).exists():
        return (Path(source) / MANIFEST_NAME).is_file()
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        return False
    with _hub_errors(str(source), revision, token, kind="repo"):
        try:
            hf_hub_download(str(source), MANIFEST_NAME, revision=revision, token=token)
        except EntryNotFoundError:  # a model repo, or (offline) a repo whose manifest is not in the cache
            return False
    return True


def download_pack(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """Download a pack into the Hugging Face cache, check every file against its manifest, and return its folder.

    Files are fetched at one commit (the one `revision` resolves to when the manifest is read), so a push in between
    never mixes two versions. Offline mode (`HF_HUB_OFFLINE=1`) reads from the cache. A file whose sha256 differs from
    the manifest is removed from the cache and raises `PackError`.
    """
    fetched = _fetch_manifest(repo_id, revision, token, cache_dir, force_download, local_files_only)
    return fetched.fetch_files()


def pull_pack(
    repo_id: str,
    save_directory: str | os.PathLike,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Download and check a pack (see `download_pack`), then copy it to the folder `save_directory`, with its card."""
    fetched = _fetch_manifest(repo_id, revision, token, cache_dir)
    folder = fetched.fetch_files()
    readme = None
    try:
        readme = hf_hub_download(repo_id, README_NAME, revision=fetched.commit, **fetched.hub_kwargs)
    except (EntryNotFoundError, HfHubHTTPError):
        logger.info(f"{fetched.source} has no {README_NAME}.")

    def write(target: Path) -> None:
        for path in [MANIFEST_NAME, *fetched.manifest.files]:
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / path, target / path)
        if readme is not None:
            shutil.copyfile(readme, target / README_NAME)

    return write_folder_atomically(save_directory, write, replaceable=MANIFEST_NAME)


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------------------


def _check_fits(model: DomainExpertsForCausalLM, manifest: PackManifest, source: str) -> None:
    """Everything that can be checked from the manifest alone: backbone, layers, gate, tokenizer, tensors."""
    ours = backbone_info(model)
    theirs = manifest.backbone
    if (ours.config_sha256, ours.weights_sha256) != (theirs.config_sha256, theirs.weights_sha256):
        what = "config" if ours.config_sha256 != theirs.config_sha256 else ""
        what += (" and weights" if what else "weights") if ours.weights_sha256 != theirs.weights_sha256 else ""
        raise IncompatibleBackboneError(
            f"Pack {manifest.name!r} ({source}) was made for backbone {theirs.describe()}, but this model's backbone "
            f"is {ours.describe()}: their {what} differ. Load the pack on the backbone it was made for."
        )
    num_layers = model.config.num_backbone_layers
    if not all(0 <= i < num_layers for i in manifest.expansion_layers):
        raise PackError(f"{source}: expansion_layers {manifest.expansion_layers} lie outside the backbone's "
                        f"{num_layers} layers.")
    if manifest.gate_trained and manifest.gate_layer != model.config.gate_layer:
        raise PackError(
            f"{source}: the gate entry of domain {manifest.name!r} reads the hidden states after layer "
            f"{manifest.gate_layer}, but this model's gate reads layer {model.config.gate_layer}. Set "
            f"model.config.gate_layer = {manifest.gate_layer} before loading it (or retrain the gate)."
        )
    if manifest.tokens and model.tokenizer is None:
        raise PackError(f"{source}: domain {manifest.name!r} brings {len(manifest.tokens)} tokens of its own, and this "
                        "model has no tokenizer: pass the backbone's tokenizer to from_backbone.")
    if manifest.tokens and "tokenizer.json" not in manifest.files:
        raise PackError(f"{source}: domain {manifest.name!r} brings tokens of its own but the pack has no tokenizer.json.")
    expected = _tensor_specs(model._new_domain_module(manifest.expansion_layers, 1 + len(manifest.tokens)).state_dict())
    problems = _spec_differences(expected, manifest.tensors)
    if problems:
        raise PackError(f"{source}: the tensors its manifest lists are not those of a domain with these blocks and "
                        f"tokens on this backbone: " + "; ".join(problems) + ".")


def _load_pack_tokenizer(folder: Path, manifest: PackManifest, model: DomainExpertsForCausalLM, source: str):
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    try:
        tokens = new_tokens_of(tokenizer, model._backbone_vocab())
    except ValueError as error:
        raise PackError(f"{source}: its tokenizer does not fit this model's backbone tokenizer. {error}") from error
    if tokens != manifest.tokens:
        raise PackError(f"{source}: its tokenizer adds {len(tokens)} tokens to the backbone's, its manifest lists "
                        f"{len(manifest.tokens)} (or in another order).")
    return tokenizer


def load_pack(
    model: DomainExpertsForCausalLM,
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    name: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> str:
    """Add the domain of a pack (a local folder or a Hub repo) to `model`; returns the domain's name in the model.

    Every check happens before the domain is attached, and any failure leaves the model as it was:
    the backbone fingerprint (`IncompatibleBackboneError`, naming both backbones), the name (taken: `ValueError`; pass
    `name=` to load it under another), the manifest against the tensors the model expects, every file's sha256 against
    the manifest, the safetensors header against the manifest, and the tokenizer against the backbone's.

    Args:
        model: the model to add the domain to.
        repo_id_or_path: a pack folder, or the id of a Hub repo holding one.
        revision: a branch or commit of the repo (pins the pack; ignored for folders, where it is an error).
        name: load the domain under this name instead of the manifest's (its control token becomes `<|domain:NAME|>`).
        token: a Hub token, for private repos.
        cache_dir, force_download, local_files_only: passed to `huggingface_hub.hf_hub_download`.
    """
    fetched = _fetch_manifest(repo_id_or_path, revision, token, cache_dir, force_download, local_files_only)
    manifest, source = fetched.manifest, fetched.source
    name = manifest.name if name is None else name
    if not _valid_domain_name(name):
        raise ValueError(f"Invalid domain name {name!r}: use letters, digits, '_', '-' and '.'.")
    if name in model.domains:
        raise ValueError(
            f"This model already has a domain named {name!r}; load the pack {source} under another name with "
            f"name=... (e.g. load_domain({str(repo_id_or_path)!r}, name={name + '_2'!r})), or remove the domain first."
        )
    _check_fits(model, manifest, source)
    folder = fetched.fetch_files()
    tokenizer = _load_pack_tokenizer(folder, manifest, model, source) if manifest.tokens else None
    state_dict = load_file(folder / WEIGHTS_NAME)
    model._attach_domain(name, list(manifest.expansion_layers), list(manifest.tokens), domain_tokenizer=tokenizer,
                         state_dict=state_dict, gate_trained=manifest.gate_trained)
    provenance = {"name": manifest.name}
    if fetched.repo_id is not None:
        provenance.update(repo_id=fetched.repo_id, revision=fetched.commit)
    model.config.domains[name]["pack"] = provenance
    logger.info(f"Loaded domain {name!r} from pack {source}.")
    return name


def load_packs(model: DomainExpertsForCausalLM, packs: list[str | os.PathLike | dict[str, Any]]) -> list[str]:
    """Load several packs in order (see `load_pack`); each entry is a folder or repo id, or a dict of `load_pack`
    keyword arguments with `repo_id_or_path`, e.g. `{"repo_id_or_path": "bob/legal", "revision": "v1", "name": "law"}`."""
    names = []
    for entry in packs:
        if isinstance(entry, dict):
            names.append(load_pack(model, **entry))
        elif isinstance(entry, (str, os.PathLike)):
            names.append(load_pack(model, entry))
        else:
            raise TypeError(f"A pack is a folder, a repo id or a dict of load_domain arguments, got {entry!r}.")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _push_errors(repo_id: str, token: Any) -> Iterator[None]:
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise PackAccessError(
                f"Pushing to {repo_id!r} needs a valid write token ("
                + ("the one passed was refused" if token else "none was passed")
                + "): pass token=... (--token) or log in with `hf auth login`."
            ) from error
        if status == 403:
            raise PackAccessError(f"The token's user may not write to {repo_id!r} (HTTP 403): push to your own "
                                  "namespace or ask for write access.") from error
        raise


def _upload(folder: Path, repo_id: str, *, token, private, revision, commit_message, commit_description, create_pr,
            delete_patterns: list[str]) -> CommitInfo:
    """Upload every file of `folder` to `repo_id` (created if needed) in ONE commit, which also deletes the repo's files
    that match `delete_patterns` and are not in `folder` (stale files of an earlier push).

    `create_commit`, not `upload_folder`: with `hf_xet` installed, `upload_folder` may split a large folder into several
    commits, and a push that fails half-way would leave half a pack.
    """
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_library_version())
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    with _push_errors(repo_id, token):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=None if create_pr else revision)
        remote = [sibling.rfilename for sibling in head.siblings or []]
        stale = [path for path in filter_repo_objects(remote, allow_patterns=delete_patterns)
                 if path not in files and path != ".gitattributes"]
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file)) for path, file in files.items()]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision, create_pr=create_pr,
                                 parent_commit=None if create_pr else head.sha)


def push_pack_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a pack folder to `repo_id` (created if needed) in one commit, after checking it against its manifest.

    The commit replaces the repo's files (but `.gitattributes`), so that no file of an earlier version lingers.
    """
    folder = Path(folder)
    manifest = PackManifest.from_folder(folder)
    _FetchedPack(manifest, folder).fetch_files()  # refuses a modified or incomplete folder
    commit = _upload(folder, repo_id, token=token, private=private, revision=revision,
                     commit_message=commit_message or f"Upload domain pack {manifest.name}",
                     commit_description=commit_description, create_pr=create_pr, delete_patterns=["*"])
    logger.info(f"Pushed pack {manifest.name!r} to {repo_id}: {commit.commit_url}")
    return commit


def push_pack(
    model: DomainExpertsForCausalLM,
    name: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    datasets: list[str] | None = None,
    evaluation: dict[str, Any] | None = None,
    license: str | None = None,
) -> CommitInfo:
    """Save domain `name` as a pack (see `save_pack`) and upload it to `repo_id` in one commit (see `push_pack_folder`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`.oid`, `.commit_url`).
    """
    with tempfile.TemporaryDirectory(prefix="domain-pack-") as tmp:
        folder = save_pack(model, name, Path(tmp) / "pack", datasets=datasets, evaluation=evaluation,
                           license=license, repo_id=repo_id)
        return push_pack_folder(folder, repo_id, token=token, private=private, revision=revision,
                                commit_message=commit_message, commit_description=commit_description,
                                create_pr=create_pr)


def push_model_to_hub(
    model: DomainExpertsForCausalLM,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a composed model in one commit: config (with `auto_map`), safetensors weights, the remote-code files, the
    tokenizer and domain tokenizers (`save_pretrained`), and a model card listing the domains and their packs.

    Earlier weights shards and domain tokenizers of the repo are deleted in the same commit; other files stay.
    """
    from .modeling_domain_experts import DOMAIN_TOKENIZERS_FOLDER

    with tempfile.TemporaryDirectory(prefix="domain-experts-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        write_model_card(model, tmp, repo_id=repo_id, tags=tags)
        commit = _upload(Path(tmp), repo_id, token=token, private=private, revision=revision,
                         commit_message=commit_message or "Upload DomainExperts model",
                         commit_description=commit_description, create_pr=create_pr,
                         delete_patterns=["*.safetensors", "*.safetensors.index.json", f"{DOMAIN_TOKENIZERS_FOLDER}/*"])
    logger.info(f"Pushed the model to {repo_id}: {commit.commit_url}")
    return commit


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
