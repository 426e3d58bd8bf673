"""A small backbone from scratch: a byte-level BPE tokenizer trained on a corpus, and a Llama model from a preset.

This is the setting of the research this library follows: a small model pretrained on one domain (stories), to which
others (recipes) are later added as domains.

| preset | hidden | layers | heads | MLP | parameters (vocabulary 4096, tied embeddings) |
|---|---|---|---|---|---|
| `tiny` | 128 | 4 | 4 | 384 | 1,377,408 |
| `small` | 256 | 8 | 8 | 768 | 7,868,672 |
| `base` | 512 | 12 | 8 | 1536 | 43,004,416 |

Parameter counts grow by `hidden` for every vocabulary entry; `backbone_parameters(preset, vocab_size)` computes them.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"

PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384},
    "small": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 768},
    "base": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 1536},
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` ids trained on `corpus`, with BOS, EOS and PAD special tokens.

    Byte-level means every string encodes (no unknown token) and `decode(encode(text)) == text` exactly. Encoding adds
    no special token; put BOS/EOS where your data format wants them.
    """
    special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(alphabet)} byte tokens plus {len(special_tokens)} special "
            f"tokens ({smallest}); a byte-level tokenizer needs at least that many."
        )
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("The corpus is empty: there is no text to train a tokenizer on.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def backbone_config(preset: str, tokenizer: PreTrainedTokenizerFast, max_position_embeddings: int = 1024) -> LlamaConfig:
    """The Llama configuration of `preset` for `tokenizer`'s vocabulary (tied input and output embeddings)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )


def create_backbone(preset: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A randomly initialised Llama model of `preset`, ready to be pretrained (see `domain-experts train`)."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(backbone_config(preset, tokenizer, **config_kwargs))


def backbone_parameters(preset: str, vocab_size: int) -> int:
    """The parameter count of `preset` with a vocabulary of `vocab_size` (tied embeddings)."""
    p = PRESETS[preset]
    hidden, layers, mlp = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"]
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    return vocab_size * hidden + layers * per_layer + hidden
