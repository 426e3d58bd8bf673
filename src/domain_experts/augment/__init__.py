"""Generative data augmentation for domain data: an LLM rewrites existing QA pairs, writes new ones from few-shot
seed examples, or paraphrases documents; quality control keeps what is worth training on.

    from domain_experts.augment import AugmentConfig, TransformersGenerator, augment

    generator = TransformersGenerator.from_pretrained("HuggingFaceTB/SmolLM2-1.7B-Instruct")
    result = augment(train, generator, AugmentConfig(strategies=["rewrite", "new_pairs"]), eval_dataset=test,
                     output_dir="augmented")
    print(result.report)  # kept and dropped, per reason and per strategy
    result.dataset        # the kept rows, with provenance

Or from the shell: `domain-experts augment train.jsonl --model ... --eval-data test.jsonl --output augmented`.
"""

from ..lazy import lazy_exports


# Names -> the submodule defining them. They are imported on first use (PEP 562), so that `domain-experts --help`,
# which needs only the light `cli` and `config` modules, does not import torch and transformers.
_EXPORTS = {
    "add_augment_command": "cli",
    "AugmentConfig": "config",
    "QualityConfig": "config",
    "EndpointError": "generators",
    "EndpointGenerator": "generators",
    "GenerationRequest": "generators",
    "Generator": "generators",
    "SamplingSettings": "generators",
    "TransformersGenerator": "generators",
    "AugmentReport": "pipeline",
    "AugmentResult": "pipeline",
    "augment": "pipeline",
    "DEFAULT_TEMPLATES": "prompts",
    "TEMPLATE_FIELDS": "prompts",
    "NearDuplicateIndex": "quality",
    "ReferenceScorer": "quality",
    "GenerationStore": "store",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "DEFAULT_TEMPLATES",
    "TEMPLATE_FIELDS",
    "AugmentConfig",
    "AugmentReport",
    "AugmentResult",
    "EndpointError",
    "EndpointGenerator",
    "GenerationRequest",
    "GenerationStore",
    "Generator",
    "NearDuplicateIndex",
    "QualityConfig",
    "ReferenceScorer",
    "SamplingSettings",
    "TransformersGenerator",
    "add_augment_command",
    "augment",
]
