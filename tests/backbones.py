"""Tiny randomly initialised backbones of the families DomainExperts supports, and a tokenizer that fits them."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    GemmaConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GlmConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    SmolLM3Config,
    StableLmConfig,
    Starcoder2Config,
)


VOCAB_SIZE = 320
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

_CORPUS = [
    "Title: Pancakes. Ingredients: flour, milk, eggs. Steps: mix, then fry in a pan.",
    "Once upon a time a fox met a crow who held a piece of cheese in her beak.",
    "The tortoise and the hare agreed to race; slow and steady wins the race.",
    "Is the sun a star? Yes. Can a fish climb a tree? No.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB_SIZE ids with BOS/EOS/PAD, trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _common(tokenizer):
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# Common sizes of the Llama-like families: 4 layers, hidden 32, 4 query heads of 8 dimensions over 2 KV heads.
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_config(family: str, vocab_size: int = VOCAB_SIZE, tokenizer=None):
    ids = _common(tokenizer or tiny_tokenizer())
    common = {**_LLAMA_LIKE, "vocab_size": vocab_size, **ids}
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8, tie_word_embeddings=False)
    if family == "gemma2":  # alternating sliding/full layers, final logit softcapping
        return Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                            final_logit_softcapping=3.0, attn_logit_softcapping=50.0)
    if family == "gemma3_text":  # local/global rotary per layer type, scaled embeddings, softcapping
        return Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=3.0)
    if family == "phi3":
        return Phi3Config(**common, tie_word_embeddings=False)
    if family == "gemma":  # scaled embeddings, tied, no softcapping
        return GemmaConfig(**common, head_dim=8)
    if family == "smollm3":  # layer 3 without rotary embeddings (NoPE)
        return SmolLM3Config(**common, no_rope_layer_interval=4, tie_word_embeddings=False)
    if family == "olmo3":  # sliding and full layers, rotary per layer type
        return Olmo3Config(**common, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "starcoder2":  # LayerNorms and linear layers with biases, a c_fc/c_proj MLP, sliding window
        return Starcoder2Config(**common, sliding_window=16, use_bias=True)
    if family == "stablelm":  # partial rotary, norms of queries and keys, attention and MLP in parallel
        return StableLmConfig(**common, qk_layernorm=True, use_parallel_residual=True)
    if family == "glm":  # a fused gate_up_proj, partial rotary, attention biases
        return GlmConfig(**common, head_dim=8)
    if family == "olmo2":
        return Olmo2Config(**common, tie_word_embeddings=False)
    if family == "granite":  # embedding multiplier, residual multiplier, logits divided by logits_scaling
        return GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                             logits_scaling=4.0, tie_word_embeddings=False)
    if family == "cohere":  # parallel attention and MLP, logits multiplied by logit_scale
        return CohereConfig(**common, logit_scale=0.5)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=True, **ids)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False, **ids)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             sliding_window=16, head_dim=8, **ids)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5, **ids)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
            "olmo3", "granite", "cohere", "smollm3", "stablelm", "starcoder2", "glm"]
"""The families of DomainExperts' architecture table, each tested by the core guarantees."""

CORE_FAMILIES = ["llama", "qwen2", "gpt2"]
"""Tied and untied embeddings, layer types, and a non-rotary family: where the slower tests run."""

UNSUPPORTED = {
    "qwen2_moe": lambda common: Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=32),
    "qwen3_moe": lambda common: Qwen3MoeConfig(**common, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=16),
    "mixtral": lambda common: MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_next": lambda common: Qwen3NextConfig(**common, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=16, linear_num_key_heads=2,
                                                 linear_num_value_heads=2, linear_key_head_dim=8,
                                                 linear_value_head_dim=8),
}
"""Families DomainExperts refuses (routed experts, hybrid linear attention), as tiny configs."""


def unsupported_backbone(family: str):
    torch.manual_seed(0)
    common = {**_LLAMA_LIKE, "vocab_size": VOCAB_SIZE, **_common(tiny_tokenizer())}
    return AutoModelForCausalLM.from_config(UNSUPPORTED[family](common)).eval()


def tiny_backbone(family: str, seed: int = 0, vocab_size: int = VOCAB_SIZE, tokenizer=None):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, tokenizer))
    return model.eval()
