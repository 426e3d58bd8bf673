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

from .cli import add_augment_command
from .config import AugmentConfig, QualityConfig
from .generators import (
    EndpointError,
    EndpointGenerator,
    GenerationRequest,
    Generator,
    SamplingSettings,
    TransformersGenerator,
)
from .pipeline import AugmentReport, AugmentResult, augment
from .prompts import DEFAULT_TEMPLATES, TEMPLATE_FIELDS
from .quality import NearDuplicateIndex, ReferenceScorer
from .store import GenerationStore


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
