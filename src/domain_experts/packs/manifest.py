"""What a pack declares and how it is checked: the manifest (`domain_pack.json`), backbone fingerprints, tensor
listings and file digests. Nothing here reads a model's weights or touches the Hub."""

from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..configuration_domain_experts import CONTROL_EMBEDDINGS, check_domain_name, control_token_for
from ..files import file_sha256


PACK_FORMAT = "domain_experts.pack"
PACK_FORMAT_VERSION = 3
"""Version 2 added routed adapters (`adapters`), output rows and biases of a domain's own tokens (`output_embeddings`,
`output_bias`, `logit_bias`) and how they were started (`token_init`); version 3 what the control token reads as
(`control_embedding`: a reader that ignored it would compute something else). Older packs still load."""
MANIFEST_NAME = "domain_pack.json"
WEIGHTS_NAME = "domain_pack.safetensors"
README_NAME = "README.md"
LIBRARY_NAME = "domain_experts"

# Files a pack may hold besides the manifest and the weights: tokenizer files, which are data (no pickle, no code).
_DATA_SUFFIXES = (".json", ".txt", ".jinja", ".model")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A manifest is a few kilobytes; one larger than this is not a manifest of ours.
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024

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


def library_version() -> str:
    """The installed `domain_experts` version, written into every pack."""
    return metadata.version(LIBRARY_NAME)


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
        expansion_layers: for each expansion block, the backbone layer it follows (may be empty when `adapters`).
        tokens: the domain's own tokens (strings, in the order of its token embedding rows 1...), without the control
            token; empty when the domain uses the backbone's tokenizer.
        gate_trained: whether the domain's entry in the learned gate is trained.
        gate_layer: the backbone layer whose hidden states the gate entry reads.
        adapters: the domain's routed low-rank adapters (`AdapterConfig` fields, with target paths inside a decoder
            layer and the adapted layers listed), or None.
        tensors: name -> `TensorSpec` of every tensor in `domain_pack.safetensors`.
        files: path -> `{"sha256": ..., "size": ...}` of every file of the pack but the manifest and the model card.
        datasets: datasets the domain was trained on (Hub ids or names), for the model card.
        token_init: how the domain's own tokens were started and trained (see `domain_experts.token_init`), or None.
        control_embedding: what the control token reads as, `"bos"` or `"learned"` (see
            `DomainExpertsForCausalLM.add_domain`); `"learned"` when absent, as in packs before release 0.3.
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
    adapters: dict[str, Any] | None = None
    token_init: dict[str, Any] | None = None
    control_embedding: str = "learned"

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
            "adapters": self.adapters,
            "tensors": {key: {"dtype": spec.dtype, "shape": list(spec.shape)} for key, spec in self.tensors.items()},
            "files": {path: dict(entry) for path, entry in self.files.items()},
            "datasets": list(self.datasets),
            "evaluation": self.evaluation,
            "token_init": self.token_init,
            "control_embedding": self.control_embedding,
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
        _check(_is_domain_name(name), "name", "a domain name (1 to 64 ASCII letters, digits, '_', '-')", name)
        adapters = data.get("adapters")
        _check(adapters is None or _valid_adapters(adapters), "adapters",
               'null or {"r": int, "alpha": number, "target_modules": [path, ...], "layers": [int, ...], '
               '"use_rslora": bool}', adapters)
        layers = data.get("expansion_layers")
        _check(isinstance(layers, list) and (layers or adapters) and all(_is_index(i) for i in layers),
               "expansion_layers", "a list of layer indices (non-empty unless the domain has adapters)", layers)
        tokens = data.get("tokens")
        _check(isinstance(tokens, list) and all(isinstance(t, str) and t for t in tokens)
               and len(set(tokens)) == len(tokens), "tokens", "a list of distinct non-empty strings", tokens)
        control_like = [t for t in tokens if t.startswith("<|domain:")]
        _check(not control_like, "tokens", "tokens of the domain's text, none spelled like a control token",
               control_like)
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
            _check(is_data_file(path), f"files.{path}", f"{WEIGHTS_NAME} or a data file ({', '.join(_DATA_SUFFIXES)})"
                   " at a relative path", path)
            _check(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                   and _is_index(entry.get("size")), f"files.{path}", 'an object {"sha256": hex, "size": int}', entry)
        datasets = data.get("datasets") or []
        _check(isinstance(datasets, list) and all(isinstance(d, str) for d in datasets), "datasets",
               "a list of strings", datasets)
        evaluation = data.get("evaluation")
        _check(evaluation is None or valid_evaluation(evaluation), "evaluation",
               'null or {"dataset": str, "split": str, "metrics": {name: number}}', evaluation)
        token_init = data.get("token_init")
        _check(token_init is None or isinstance(token_init, dict), "token_init", "null or an object", token_init)
        control_embedding = data.get("control_embedding", "learned")
        _check(control_embedding in CONTROL_EMBEDDINGS, "control_embedding",
               " or ".join(map(repr, CONTROL_EMBEDDINGS)), control_embedding)
        library_version_ = data.get("library_version")
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
            library_version=library_version_ if isinstance(library_version_, str) else None,
            format_version=version,
            adapters=dict(adapters) if adapters is not None else None,
            token_init=token_init,
            control_embedding=control_embedding,
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> PackManifest:
        """Read and validate `folder/domain_pack.json`."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise PackError(f"{folder} is not a domain pack: it has no {MANIFEST_NAME}.")
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise PackError(f"{path} is {path.stat().st_size:,} bytes: not a pack manifest (a few kilobytes).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PackError(f"{path} is not valid JSON ({error}).") from error
        except RecursionError as error:
            raise PackError(f"{path} is not a pack manifest: its JSON is nested too deeply to read.") from error
        return cls.from_dict(data)


def _check(condition: Any, field_name: str, expected: str, got: Any) -> None:
    if not condition:
        try:
            shown = repr(got)
        except RecursionError:
            shown = f"a {type(got).__name__} nested too deeply to show"
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise PackError(f"Invalid {MANIFEST_NAME}: {field_name!r} must be {expected}, got {shown}.")


def _valid_adapters(adapters: Any) -> bool:
    if not isinstance(adapters, dict) or set(adapters) != {"r", "alpha", "target_modules", "layers", "use_rslora"}:
        return False
    paths = adapters["target_modules"]
    return (_is_index(adapters["r"]) and adapters["r"] >= 1
            and isinstance(adapters["alpha"], (int, float)) and not isinstance(adapters["alpha"], bool)
            and isinstance(paths, list) and paths and all(isinstance(p, str) and _SAFE_PATH.match(p) for p in paths)
            and isinstance(adapters["layers"], list) and adapters["layers"] and all(_is_index(i) for i in adapters["layers"])
            and isinstance(adapters["use_rslora"], bool))


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_domain_name(name: Any) -> bool:
    try:
        check_domain_name(name)
    except ValueError:
        return False
    return True


def is_data_file(path: Any) -> bool:
    """Whether a pack may list `path`: its weights, or a data file at a safe relative path (never code or pickles)."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or any(part in (".", "..") for part in path.split("/")):
        return False
    if path in (MANIFEST_NAME, README_NAME):
        return False
    return path == WEIGHTS_NAME or path.endswith(_DATA_SUFFIXES)


def valid_evaluation(evaluation: Any) -> bool:
    """Whether `evaluation` has the shape a manifest and a model card take (see `PackManifest.evaluation`)."""
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict) or not evaluation["metrics"]:
        return False
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in evaluation["metrics"].values())
    texts = all(isinstance(evaluation.get(k, ""), str) for k in ("dataset", "split", "task"))
    return numbers and texts and all(isinstance(k, str) for k in evaluation["metrics"])


# ----------------------------------------------------------------------------------------------------------------
# Files and tensors against the manifest
# ----------------------------------------------------------------------------------------------------------------


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of one file: its sha256 and size."""
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def verify_pack_files(folder: str | os.PathLike, manifest: PackManifest) -> list[str]:
    """The files of `folder` whose size or sha256 differs from the manifest (a missing file counts), in manifest order."""
    bad = []
    for path, entry in manifest.files.items():
        file = Path(folder) / path
        if not file.is_file() or file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]:
            bad.append(path)
    return bad


def tensor_specs(state_dict: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {key: TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for key, t in state_dict.items()}


def spec_differences(expected: dict[str, TensorSpec], got: dict[str, TensorSpec], limit: int = 5) -> list[str]:
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


def check_weights_header(folder: Path, manifest: PackManifest, source: str) -> None:
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
    problems = spec_differences(manifest.tensors, found)
    if problems:
        raise PackError(f"{source}: {WEIGHTS_NAME} does not match its manifest: " + "; ".join(problems) + ".")

