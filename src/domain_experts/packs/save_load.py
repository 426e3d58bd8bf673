"""Saving a domain of a model as a pack, and loading a pack into a model: every check happens before the model
changes, and a pack's files are read only as the data its manifest lists."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..configuration_domain_experts import check_domain_name
from ..files import reading_folder, write_folder_atomically
from ..tokenization_domain_experts import add_tokens_at_ids
from .cards import render_pack_card
from .hub import FetchedPack, fetch_manifest, push_pack_folder
from .manifest import (
    MANIFEST_NAME,
    README_NAME,
    WEIGHTS_NAME,
    IncompatibleBackboneError,
    PackError,
    PackManifest,
    TensorSpec,
    backbone_info,
    file_entry,
    is_data_file,
    library_version,
    spec_differences,
    tensor_specs,
    valid_evaluation,
)


logger = logging.get_logger(__name__)

# tokenizer_config.json entries that say how a tokenizer was loaded or is used, not what it computes: they may differ
# between the model that wrote a pack and the one that loads it. The last four are the truncation and padding of a fast
# tokenizer's last call, which transformers copies from tokenizer.json into the config when it loads one.
_USAGE_SETTINGS = frozenset({"name_or_path", "padding_side", "truncation_side", "model_max_length",
                             "split_special_tokens", "is_local", "local_files_only", "_commit_hash", "pad_token_type_id",
                             "max_length", "stride", "truncation_strategy", "pad_to_multiple_of"})
# tokenizer.json sections that hold the padding and truncation a caller last asked for, not the tokenizer's pipeline.
_USAGE_SECTIONS = frozenset({"padding", "truncation"})


def _setting(config: dict, key: str):
    """A tokenizer_config.json entry, an empty list counting as absent (transformers writes either)."""
    value = config.get(key)
    return None if value == [] else value


# ----------------------------------------------------------------------------------------------------------------
# The pack's tokenizer: the backbone's plus the domain's tokens, nothing else
# ----------------------------------------------------------------------------------------------------------------


def _merges(tokenizer: PreTrainedTokenizerBase) -> list[list[str]]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in merges]


def pack_tokenizer(backbone_tokenizer: PreTrainedTokenizerBase, backbone_vocab_size: int, tokens: list[str],
                   new_merges: list[list[str]]) -> PreTrainedTokenizerBase:
    """The tokenizer a pack of a domain with `tokens` holds: the backbone's, with `tokens` at the ids right after the
    backbone vocabulary and `new_merges` ranked after all of the backbone's. Built the same way when a pack is saved
    and when it is loaded, so the pack's files can be checked against it."""
    if not tokens:
        return backbone_tokenizer
    ids = {token: backbone_vocab_size + row for row, token in enumerate(tokens)}
    return add_tokens_at_ids(backbone_tokenizer, ids, merges=[tuple(merge) for merge in new_merges])


def _saved_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.relative_to(folder).as_posix(): path.read_bytes()
                for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def _tokenizer_differences(expected: dict[str, bytes], folder: Path, listed: list[str]) -> list[str]:
    """What the pack's listed tokenizer files change relative to the expected ones: files we would not write, and the
    sections of tokenizer.json and settings of tokenizer_config.json that differ. A file we would write may be left
    out: the tokenizer is rebuilt from the backbone's, never read from the pack."""
    problems = []
    extra = sorted(set(listed) - set(expected))
    if extra:
        problems.append(f"unexpected tokenizer file(s) {', '.join(extra)}")
    for path in sorted(set(expected) & set(listed)):
        ours = expected[path]
        theirs = (folder / path).read_bytes()
        if ours == theirs:
            continue
        if not path.endswith(".json"):
            problems.append(f"{path} differs")
            continue
        try:
            ours_json, theirs_json = json.loads(ours), json.loads(theirs)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            problems.append(f"{path} is not the JSON of a tokenizer")
            continue
        if not isinstance(theirs_json, dict):
            problems.append(f"{path} is not a JSON object")
            continue
        if path == "tokenizer_config.json":
            keys = (ours_json.keys() | theirs_json.keys()) - _USAGE_SETTINGS
            changed = sorted(key for key in keys if _setting(ours_json, key) != _setting(theirs_json, key))
            if changed:
                problems.append(f"tokenizer_config.json changes {', '.join(changed)}")
            continue
        changed = sorted(key for key in (ours_json.keys() | theirs_json.keys()) - _USAGE_SECTIONS
                         if ours_json.get(key) != theirs_json.get(key))
        if not changed:
            continue
        if "model" in changed and isinstance(theirs_json.get("model"), dict):
            changed.remove("model")
            changed += [f"model.{key}" for key in sorted(ours_json["model"].keys() | theirs_json["model"].keys())
                        if ours_json["model"].get(key) != theirs_json["model"].get(key)]
        problems.append(f"{path} changes {', '.join(changed)}")
    return problems


def _load_pack_tokenizer(model, folder: Path, manifest: PackManifest, source: str) -> PreTrainedTokenizerBase | None:
    """The domain's tokenizer, built from the model's own backbone tokenizer and the pack's declared tokens and merges,
    after checking that the pack's tokenizer files hold exactly that (normalizer, pre-tokenizer, decoder,
    post-processor, added tokens, settings): a pack changes what its domain reads and writes only by its tokens."""
    listed = [path for path in manifest.files if path != WEIGHTS_NAME]
    if manifest.tokens and "tokenizer.json" not in listed:
        raise PackError(f"{source}: domain {manifest.name!r} brings tokens of its own but the pack has no tokenizer.json.")
    if not listed:
        return None
    if model.tokenizer is None:
        raise PackError(f"{source}: the pack holds a tokenizer, and this model has none to check it against: pass the "
                        "backbone's tokenizer to from_backbone.")
    backbone_tokenizer = model.tokenizer.backbone_tokenizer()
    backbone_merges = _merges(backbone_tokenizer)
    new_merges = []
    if manifest.tokens:
        try:
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            merges = data["model"]["merges"]
            merges = [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in merges]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise PackError(f"{source}: its tokenizer.json is not a BPE tokenizer ({error}).") from error
        if merges[: len(backbone_merges)] != backbone_merges:
            raise PackError(f"{source}: its tokenizer's merges are not the backbone's followed by the domain's: it was "
                            "made for another tokenizer.")
        new_merges = merges[len(backbone_merges):]
        known = set(backbone_tokenizer.get_vocab()) | set(manifest.tokens)
        for merge in new_merges:
            if len(merge) != 2 or not all(isinstance(piece, str) and piece in known for piece in merge) or \
                    "".join(merge) not in known:
                raise PackError(f"{source}: its tokenizer merges {merge!r}, which does not join two known tokens into "
                                "one: the domain's tokens must be merges of the backbone's.")
    tokenizer = pack_tokenizer(backbone_tokenizer, model.config.backbone_vocab_size, manifest.tokens, new_merges)
    problems = _tokenizer_differences(_saved_files(tokenizer), folder, listed)
    if problems:
        raise PackError(f"{source}: its tokenizer is not the backbone's tokenizer plus the domain's declared tokens: "
                        + "; ".join(problems) + ".")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def save_pack(
    model,
    name: str,
    save_directory: str | os.PathLike,
    *,
    datasets: list[str] | None = None,
    evaluation: dict[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write domain `name` of `model` (a `DomainExpertsForCausalLM`) as a pack folder (see `domain_experts.packs`).

    The folder is written beside `save_directory` and renamed into place once complete, under a lock that serialises
    writers: an existing pack there is replaced whole, and an error leaves whatever was there untouched. A folder that
    holds anything but a pack is refused.

    Args:
        model: the model holding the domain.
        name: the domain.
        save_directory: the pack folder to write.
        datasets: what the domain was trained on (Hub dataset ids or names), for the model card's metadata.
        evaluation: `{"dataset": "recipes", "split": "test", "metrics": {"perplexity": 4.2}}`, for the model card.
        license: a license id for the model card's metadata (e.g. `apache-2.0`).
        repo_id: the Hub repo the pack is meant for, shown in the model card's usage snippet.
        overwrite: replace a pack already in `save_directory` (False: refuse).

    Returns:
        The pack folder.
    """
    model.check_domain(name)
    if evaluation is not None and not valid_evaluation(evaluation):
        raise ValueError(
            'evaluation must look like {"dataset": "recipes", "split": "test", "metrics": {"perplexity": 4.2}} '
            f"(metric values are numbers), got {evaluation!r}."
        )
    settings = model.config.domains[name]
    tokens = list(settings["tokens"][1:])
    if tokens and model.tokenizer is None:
        raise ValueError(f"Domain {name!r} has tokens of its own, but the model has no tokenizer to save them with: "
                         "load the model with its tokenizer.")
    state_dict = {key: t.detach().cpu().contiguous() for key, t in model.domains[name].state_dict().items()}
    tokenizer = None
    if model.tokenizer is not None:
        backbone_tokenizer = model.tokenizer.backbone_tokenizer()
        new_merges = _merges(model.tokenizer.tokenizer_for(name))[len(_merges(backbone_tokenizer)):] if tokens else []
        tokenizer = pack_tokenizer(backbone_tokenizer, model.config.backbone_vocab_size, tokens, new_merges)
    manifest_fields = dict(
        name=name, backbone=backbone_info(model), expansion_layers=list(settings["expansion_layers"]), tokens=tokens,
        gate_trained=bool(settings.get("gate", False)), gate_layer=int(model.config.gate_layer),
        adapters=settings.get("adapters"), tensors=tensor_specs(state_dict), datasets=list(datasets or []), evaluation=evaluation,
        library_version=library_version(), token_init=settings.get("token_init"),
        control_embedding=model.config.control_embedding_of(name),
    )

    def write(folder: Path) -> None:
        # One metadata key: safetensors writes several in a random order, and a pack's bytes must not vary.
        save_file(state_dict, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        if tokenizer is not None:
            for path, data in _saved_files(tokenizer).items():
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(data)
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            if not is_data_file(relative):
                raise RuntimeError(f"Unexpected file {relative} in a pack being written.")
            files[relative] = file_entry(path)
        manifest = PackManifest(files=files, **manifest_fields)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        render_pack_card(manifest, repo_id=repo_id, license=license).save(folder / README_NAME)

    target = write_folder_atomically(save_directory, write, replaceable=MANIFEST_NAME, overwrite=overwrite)
    logger.info(f"Saved domain {name!r} as a pack in {target}.")
    return target


def push_pack(model, name: str, repo_id: str, *, token: str | None = None, private: bool | None = None,
              revision: str | None = None, commit_message: str | None = None, commit_description: str | None = None,
              create_pr: bool = False, datasets: list[str] | None = None, evaluation: dict[str, Any] | None = None,
              license: str | None = None):
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


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------------------


def _check_fits(model, manifest: PackManifest, source: str) -> None:
    """Everything that can be checked from the manifest alone: backbone, layers, gate, tensors."""
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
    try:
        specs = model.domain_state_specs(manifest.expansion_layers, len(manifest.tokens), manifest.adapters,
                                         untied_output="output_embeddings" in manifest.tensors,
                                         output_bias="output_bias" in manifest.tensors,
                                         logit_bias="logit_bias" in manifest.tensors)
    except ValueError as error:  # adapters on linear layers or layers this backbone does not have
        raise PackError(f"{source}: {error}") from error
    expected = {key: TensorSpec(str(dtype).removeprefix("torch."), shape) for key, (dtype, shape) in specs.items()}
    problems = spec_differences(expected, manifest.tensors)
    if problems:
        raise PackError(f"{source}: the tensors its manifest lists are not those of a domain with these blocks and "
                        f"tokens on this backbone: " + "; ".join(problems) + ".")


def _read_pack(model, fetched: FetchedPack) -> tuple[dict[str, torch.Tensor], PreTrainedTokenizerBase | None]:
    """The checked tensors and tokenizer of a pack whose manifest fits `model`."""
    folder = fetched.fetch_files()
    tokenizer = _load_pack_tokenizer(model, folder, fetched.manifest, fetched.source)
    state_dict = load_file(folder / WEIGHTS_NAME)
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PackError(f"{fetched.source}: tensor {key} holds NaN or infinite values; refusing the pack.")
    return state_dict, tokenizer


def load_pack(
    model,
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

    Every check happens before the domain is attached, and any failure leaves the model as it was: the name (see
    `check_domain_name`; a taken name is a `ValueError`: pass `name=` to load it under another), the backbone
    fingerprint (`IncompatibleBackboneError`, naming both backbones), the manifest against the tensors the model
    expects, every file's sha256 against the manifest, the safetensors header against the manifest, finite tensors,
    and the tokenizer against the backbone's tokenizer plus the declared tokens. Only the files the manifest lists are
    read. A local folder is read under the lock its writers take, so a load sees one whole version of it.

    Args:
        model: the model to add the domain to.
        repo_id_or_path: a pack folder, or the id of a Hub repo holding one.
        revision: a branch or commit of the repo (pins the pack; ignored for folders, where it is an error).
        name: load the domain under this name instead of the manifest's (its control token becomes `<|domain:NAME|>`).
        token: a Hub token, for private repos.
        cache_dir, force_download, local_files_only: passed to `huggingface_hub.hf_hub_download`.
    """
    if name is not None:
        check_domain_name(name)
    if os.path.isdir(repo_id_or_path):
        with reading_folder(repo_id_or_path):
            return _load(model, fetch_manifest(repo_id_or_path, revision), name, repo_id_or_path)
    fetched = fetch_manifest(repo_id_or_path, revision, token, cache_dir, force_download, local_files_only)
    return _load(model, fetched, name, repo_id_or_path)


def _load(model, fetched: FetchedPack, name: str | None, repo_id_or_path) -> str:
    manifest, source = fetched.manifest, fetched.source
    name = manifest.name if name is None else name
    if name in model.domains:
        raise ValueError(
            f"This model already has a domain named {name!r}; load the pack {source} under another name with "
            f"name=... (e.g. load_domain({str(repo_id_or_path)!r}, name={name + '_2'!r}); on the command line "
            f"{name + '_2'}={repo_id_or_path}), or remove the domain first."
        )
    _check_fits(model, manifest, source)
    state_dict, tokenizer = _read_pack(model, fetched)
    provenance = {"name": manifest.name}
    if fetched.repo_id is not None:
        provenance.update(repo_id=fetched.repo_id, revision=fetched.commit)
    try:
        model.add_domain(name, expansion_layers=list(manifest.expansion_layers),
                         tokenizer=tokenizer if manifest.tokens else None, adapters=manifest.adapters,
                         state_dict=state_dict, gate_trained=manifest.gate_trained, provenance=provenance,
                         token_init=manifest.token_init, control_embedding=manifest.control_embedding)
    except ValueError as error:
        raise PackError(f"{source}: {error}") from error
    logger.info(f"Loaded domain {name!r} from pack {source}.")
    return name


def parse_pack_spec(spec: str) -> dict[str, str]:
    """`[NAME=]SOURCE[@REVISION]` (the command line's way to name a pack) -> `load_pack` arguments; an existing folder
    is taken as it is."""
    if os.path.isdir(spec):
        return {"repo_id_or_path": spec}
    name, separator, rest = spec.partition("=")
    if not separator or "/" in name:
        name, rest = None, spec
    source, separator, revision = rest.partition("@")
    entry = {"repo_id_or_path": source}
    if separator:
        entry["revision"] = revision
    if name:
        entry["name"] = name
    return entry


def load_packs(model, packs: list[str | os.PathLike | dict[str, Any]]) -> list[str]:
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


__all__ = ["load_pack", "load_packs", "pack_tokenizer", "parse_pack_spec", "push_pack", "save_pack"]
