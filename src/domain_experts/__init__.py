"""domain_experts: one small language model, many domains, none forgotten.

The model classes load on first use (`from domain_experts import DomainExpertsForCausalLM`), so that importing a light
part of the package, the command line's help above all, does not import torch and transformers.
"""

from .lazy import lazy_exports


__version__ = "0.2.0"

_LAZY = {
    "AdapterConfig": "configuration_domain_experts",
    "DomainExpertsConfig": "configuration_domain_experts",
    "check_domain_name": "configuration_domain_experts",
    "control_token_for": "configuration_domain_experts",
    "DomainExpertsForCausalLM": "modeling_domain_experts",
    "DomainExpertsPreTrainedModel": "modeling_domain_experts",
    "DomainExpertsTokenizer": "tokenization_domain_experts",
    "TokenInitConfig": "token_init",
    "add_domain_with_tokens": "token_init",
    "initialize_domain_tokens": "token_init",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
