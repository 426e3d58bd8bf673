"""Tokens per character of domain tokenizers against their backbone's tokenizer (issue: domain tokenizers, point 5).

    python benchmarks/domain_tokenizers.py [--smollm2-new-tokens 4000] [--stories-vocab 4096] [--stories-new-tokens 1000]

(i) the SmolLM2 tokenizer against it extended for recipes and for stories; (ii) a tokenizer trained on stories
against it extended for recipes. New tokens are learned from the domain's `train` split; tokens per character are
measured on `validation` (where the number of new tokens was chosen) and on the held-out `test` split. "ceiling" is
the best any within-word extension can do: one token per pre-tokenized word.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from domain_experts.data import load_texts
from domain_experts.scratch import train_tokenizer
from domain_experts.smollm2 import GGUF_FILE, smollm2_folder
from domain_experts.tokenization_domain_experts import extend_tokenizer, new_tokens_of


def tokens_per_char(tokenizer, texts: list[str]) -> float:
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / sum(len(t) for t in texts)


def words_per_char(tokenizer, texts: list[str]) -> float:
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    return sum(len(pre_tokenizer.pre_tokenize_str(t)) for t in texts) / sum(len(t) for t in texts)


def compare(label: str, base, domain: str, num_new_tokens: int) -> dict:
    extended = extend_tokenizer(base, load_texts(domain, "train"), num_new_tokens)
    new_tokens = len(new_tokens_of(extended, base.get_vocab()))
    row = {"tokenizer": label, "domain": domain, "new_tokens": new_tokens}
    for split in ("validation", "test"):
        texts = load_texts(domain, split)
        before, after = tokens_per_char(base, texts), tokens_per_char(extended, texts)
        assert [extended.decode(ids) for ids in extended(texts)["input_ids"]] == texts
        row[split] = {"base": before, "extended": after, "cut": 1 - after / before,
                      "ceiling_cut": 1 - words_per_char(base, texts) / before}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2-new-tokens", type=int, default=4000)
    parser.add_argument("--stories-vocab", type=int, default=4096)
    parser.add_argument("--stories-new-tokens", type=int, default=1000)
    parser.add_argument("--output", default="benchmarks/results/domain_tokenizers.json")
    args = parser.parse_args()

    smollm2 = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_FILE)
    stories = train_tokenizer(load_texts("stories", "train"), vocab_size=args.stories_vocab)
    rows = [
        compare("SmolLM2-135M", smollm2, "recipes", args.smollm2_new_tokens),
        compare("SmolLM2-135M", smollm2, "stories", args.smollm2_new_tokens),
        compare(f"stories BPE {args.stories_vocab}", stories, "recipes", args.stories_new_tokens),
    ]
    print("| backbone tokenizer | domain | new tokens | split | tokens/char before | after | cut | ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for split in ("validation", "test"):
            r = row[split]
            print(f"| {row['tokenizer']} | {row['domain']} | {row['new_tokens']} | {split} | {r['base']:.4f} | "
                  f"{r['extended']:.4f} | {r['cut']:.1%} | {r['ceiling_cut']:.1%} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
