"""Quality control of generated rows: duplicate and leakage detection, and scoring with a reference model."""

import math
import re
import unicodedata
import zlib
from collections.abc import Iterable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def normalize(text: str) -> str:
    """Lower case, letters and digits only, single spaces: "Is it?" and "is  it" are exact duplicates."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def shingles(text: str, size: int) -> np.ndarray:
    """The distinct character `size`-grams of `normalize(text)`, as stable 32-bit hashes."""
    text = normalize(text)
    grams = {text[i : i + size] for i in range(max(1, len(text) - size + 1))}
    return np.unique(np.fromiter((zlib.crc32(gram.encode()) for gram in grams), dtype=np.uint64, count=len(grams)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


class NearDuplicateIndex:
    r"""
    Finds, among the texts added so far, one whose character n-gram Jaccard similarity with a query is at least
    `threshold`, and tells exact duplicates (same normalized text) apart.

    MinHash signatures with locality-sensitive hashing propose candidates (so the cost does not grow with the number
    of pairs), and the exact Jaccard similarity of each candidate decides. The banding is chosen so that a pair at
    the threshold becomes a candidate with probability of at least 99.5%, and a more similar pair more surely still.

    Args:
        threshold (`float`): the similarity from which two texts are near duplicates.
        shingle_size (`int`): the n of the character n-grams.
        num_permutations (`int`): length of the MinHash signatures.
        seed (`int`): seed of the hash permutations.
    """

    _PRIME = (1 << 31) - 1

    def __init__(self, threshold: float, shingle_size: int = 3, num_permutations: int = 128, seed: int = 0):
        self.threshold = threshold
        self.shingle_size = shingle_size
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, self._PRIME, num_permutations, dtype=np.uint64)
        self._b = rng.integers(0, self._PRIME, num_permutations, dtype=np.uint64)
        self._rows_per_band = self._band_size(threshold, num_permutations)
        self._num_bands = num_permutations // self._rows_per_band
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self._num_bands)]
        self._exact: dict[str, int] = {}
        self._shingles: list[np.ndarray] = []
        self._ids: list[object] = []

    @staticmethod
    def _band_size(threshold: float, num_permutations: int) -> int:
        """The most rows per band (fewest false candidates) that still finds a pair at `threshold` 99.5% of the time."""
        best = 1
        for rows in range(1, num_permutations + 1):
            bands = num_permutations // rows
            if 1 - (1 - threshold**rows) ** bands >= 0.995:
                best = rows
        return best

    def _bands(self, hashes: np.ndarray) -> list[bytes]:
        signature = ((np.outer(hashes, self._a) + self._b) % self._PRIME).min(axis=0)
        r = self._rows_per_band
        return [signature[i * r : (i + 1) * r].tobytes() for i in range(self._num_bands)]

    def add(self, text: str, row_id: object) -> None:
        """Index `text` under `row_id` (what `query` returns when it matches)."""
        hashes = shingles(text, self.shingle_size)
        index = len(self._ids)
        self._ids.append(row_id)
        self._shingles.append(hashes)
        self._exact.setdefault(normalize(text), index)
        for bucket, band in zip(self._buckets, self._bands(hashes)):
            bucket.setdefault(band, []).append(index)

    def query(self, text: str) -> tuple[object, float] | None:
        """`(row_id, similarity)` of the most similar indexed text at or above the threshold (1.0 for an exact
        duplicate), or `None`."""
        exact = self._exact.get(normalize(text))
        if exact is not None:
            return self._ids[exact], 1.0
        hashes = shingles(text, self.shingle_size)
        bands = zip(self._buckets, self._bands(hashes))
        candidates = {index for bucket, band in bands for index in bucket.get(band, ())}
        best = max(((jaccard(hashes, self._shingles[i]), i) for i in candidates), default=None)
        if best is None or best[0] < self.threshold:
            return None
        return self._ids[best[1]], best[0]

    def __len__(self) -> int:
        return len(self._ids)


class ReferenceScorer:
    r"""
    Scores rows with a reference causal LM: the mean log-likelihood per token of a row's answer part given its
    prompt part (for QA, the answer and explanation given the question; for text, the whole text). A low score
    flags rows the reference model finds implausible: a wrong label, an explanation that does not follow, garbled
    text. Any causal LM with its tokenizer works.

    Args:
        model (`PreTrainedModel`): the reference model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        batch_size (`int`): rows per forward pass.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, gguf_file: str | None = None, batch_size: int = 8) -> "ReferenceScorer":
        """Load the reference model with `AutoModelForCausalLM` / `AutoTokenizer`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file), batch_size=batch_size)

    @torch.no_grad()
    def score(self, pairs: Iterable[tuple[str, str]]) -> list[float]:
        """The score of each `(prompt, completion)` pair: mean log p(completion tokens | prompt), in nats."""
        pairs = list(pairs)
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            rows = []
            for prompt, completion in pairs[start : start + self.batch_size]:
                prefix = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
                if not prefix:  # the first completion token needs something to be predicted from
                    bos = self.tokenizer.bos_token_id
                    prefix = [bos if bos is not None else self.tokenizer.eos_token_id]
                target = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
                if not target:
                    raise ValueError(f"Nothing to score: the completion of {prompt!r} is empty.")
                rows.append((prefix, target))
            length = max(len(prefix) + len(target) for prefix, target in rows)
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), length), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, (prefix, target) in enumerate(rows):  # right padding: positions stay 0, 1, 2, ...
                ids = prefix + target
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                labels[i, len(prefix) : len(ids)] = torch.tensor(target)
            device = self.model.device
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logits, labels = logits[:, :-1].float(), labels[:, 1:].to(device)
            token_logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            mask = labels != -100
            scores.extend(((token_logp * mask).sum(-1) / mask.sum(-1)).tolist())
        if any(math.isnan(score) for score in scores):
            raise ValueError("The reference model returned NaN scores; check its dtype and weights.")
        return scores
