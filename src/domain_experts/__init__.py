"""domain_experts: one small language model, many domains, none forgotten."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_domain_experts import DomainExpertsConfig, control_token_for
from .modeling_domain_experts import DomainExpertsForCausalLM, DomainExpertsPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(DomainExpertsConfig.model_type, DomainExpertsConfig, exist_ok=True)
AutoModelForCausalLM.register(DomainExpertsConfig, DomainExpertsForCausalLM, exist_ok=True)
# save_pretrained copies the two flat model files next to the weights and writes `auto_map`, so the saved model
# loads with `trust_remote_code=True` where this package is not installed.
DomainExpertsConfig.register_for_auto_class()
DomainExpertsForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DomainExpertsConfig", "DomainExpertsForCausalLM", "DomainExpertsPreTrainedModel", "control_token_for"]
