"""Bits per character and perplexity of a language model on texts, from summed negative log-likelihoods."""

import math

import datasets
import evaluate


_DESCRIPTION = """
Bits per character (BPC) is the total negative log-likelihood of the texts, in bits, divided by their number of
characters. Unlike perplexity, it does not depend on the tokenizer, so it compares models with different tokenizers
(a backbone and a domain with tokens of its own, say). Perplexity is reported too, per target token.
"""

_KWARGS_DESCRIPTION = """
Args:
    negative_log_likelihoods (`list[float]`): for each text, the summed negative log-likelihood of its target tokens,
        in nats (natural log).
    num_tokens (`list[int]`): for each text, how many target tokens that sum covers.
    num_characters (`list[int]`): for each text, its length in characters.
Returns:
    bits_per_character (`float`), perplexity (`float`), num_texts (`int`).
Example:
    >>> metric = evaluate.load("path/to/domain_experts/metrics/bits_per_character")
    >>> result = metric.compute(negative_log_likelihoods=[6.931], num_tokens=[5], num_characters=[10])
    >>> round(result["bits_per_character"], 3)
    1.0
"""


class BitsPerCharacter(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "negative_log_likelihoods": datasets.Value("float64"),
                "num_tokens": datasets.Value("int64"),
                "num_characters": datasets.Value("int64"),
            }),
        )

    def _compute(self, negative_log_likelihoods, num_tokens, num_characters):
        total = sum(negative_log_likelihoods)
        characters, tokens = sum(num_characters), sum(num_tokens)
        if characters == 0 or tokens == 0:
            raise ValueError("bits_per_character needs at least one character and one target token.")
        return {
            "bits_per_character": total / math.log(2) / characters,
            "perplexity": math.exp(total / tokens),
            "num_texts": len(num_characters),
        }
