"""Routing accuracy of a domain gate: how often a row goes to the domain (or the bare backbone) it belongs to."""

from collections import Counter

import datasets
import evaluate


_DESCRIPTION = """
The share of rows routed to the right place, overall and per true route. Routes are names: a domain's name, or
"none" for the bare backbone.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): where each row was routed.
    references (`list[str]`): where each row belongs.
Returns:
    accuracy (`float`), per_route (`dict[str, float]`: accuracy among the rows of each true route), confusion
    (`dict[str, dict[str, int]]`: for each true route, how many rows went where).
Example:
    >>> metric = evaluate.load("path/to/domain_experts/metrics/routing_accuracy")
    >>> metric.compute(predictions=["recipes", "none"], references=["recipes", "stories"])["accuracy"]
    0.5
"""


class RoutingAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("routing_accuracy needs at least one row.")
        confusion: dict[str, Counter] = {}
        for predicted, true in zip(predictions, references):
            confusion.setdefault(true, Counter())[predicted] += 1
        return {
            "accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references),
            "per_route": {true: counts[true] / sum(counts.values()) for true, counts in sorted(confusion.items())},
            "confusion": {true: dict(counts) for true, counts in sorted(confusion.items())},
        }
