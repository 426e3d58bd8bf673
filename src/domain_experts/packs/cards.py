"""Model cards of packs and composed models, rendered from `model_cards/` with Hub metadata."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .manifest import LIBRARY_NAME, README_NAME, WEIGHTS_NAME, BackboneInfo, PackManifest, backbone_info, library_version


def _template(name: str) -> str:
    """A model card template from `model_cards/` (the repo's top-level folder, shipped in the package as a link)."""
    return (resources.files(LIBRARY_NAME) / "model_cards" / name).read_text(encoding="utf-8")


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a Hub repo (not a local folder), else None."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def _backbone_link(backbone: BackboneInfo) -> str:
    hub_id = hub_model_id(backbone.name_or_path)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if backbone.name_or_path:
        return f"`{backbone.name_or_path}`"
    return f"(an unnamed `{backbone.model_type}` model)"


def render_pack_card(manifest: PackManifest, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """The model card of a pack: `model_cards/domain_pack.md` with Hub metadata (library, base model, tags, datasets,
    and `model-index` results when the manifest holds an evaluation)."""
    backbone_id = hub_model_id(manifest.backbone.name_or_path)
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
        adapters=manifest.adapters,
        control_token=manifest.control_token,
        num_tokens=len(manifest.tokens),
        num_parameters=manifest.num_parameters,
        gate_trained=manifest.gate_trained,
        gate_layer=manifest.gate_layer,
        datasets=manifest.datasets,
        evaluation=evaluation,
        format_version=manifest.format_version,
        tokenizer_files=[path for path in manifest.files if path != WEIGHTS_NAME],
        library_version=manifest.library_version or library_version(),
    )


def render_model_card(model, repo_id: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The model card of a composed model (`DomainExpertsForCausalLM`): `model_cards/composed_model.md`, listing each
    domain and where it came from."""
    backbone = backbone_info(model)
    backbone_id = hub_model_id(backbone.name_or_path)
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
            "adapters": settings.get("adapters"),
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
        library_version=library_version(),
    )


def write_model_card(model, save_directory: str | os.PathLike, repo_id: str | None = None,
                     tags: list[str] | None = None) -> Path:
    """Write the composed model's card as `save_directory/README.md` (next to what `save_pretrained` wrote)."""
    path = Path(save_directory) / README_NAME
    render_model_card(model, repo_id=repo_id, tags=tags).save(path)
    return path


__all__ = ["render_model_card", "render_pack_card", "write_model_card"]
