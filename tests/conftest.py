import copy
import os
import sys

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
# The tiny test models spend more time synchronising threads than computing; one thread is faster and leaves the other
# core to subprocesses. Tests on the real backbone take every core back (see test_slow_smollm2.py).
torch.set_num_threads(1)

from backbones import FAMILIES, tiny_backbone, tiny_tokenizer  # noqa: E402

from domain_experts import DomainExpertsForCausalLM  # noqa: E402


TEXTS = {
    "recipes": "Title: Pancakes. Ingredients: flour",
    "stories": "Once upon a time a fox met",
    "base": "Is the sun a star?",
}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture
def setup(family, tokenizer):
    """A DomainExperts model over a tiny backbone of `family`, and an untouched copy of that backbone."""
    backbone = tiny_backbone(family)
    reference = copy.deepcopy(backbone)
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    return model, reference


def make_batch(model, rows: list[tuple[str, str | None]]) -> dict:
    """Left-padded batch of (text, domain) rows with the position ids `generate` would use."""
    encoded = model.tokenizer([text for text, _ in rows], domain=[domain for _, domain in rows], padding=True,
                              return_tensors="pt")
    mask = encoded["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": position_ids}


def labels_for(batch: dict) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def train_domain(model, name: str, batch: dict, steps: int = 3, lr: float = 5e-2) -> None:
    """A few AdamW steps on domain `name` only, as a user would run them."""
    optimizer = torch.optim.AdamW(model.domain_parameters(name), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels_for(batch)).loss
        assert torch.isfinite(loss), loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def as_base_batch(model, batch: dict) -> dict:
    """`batch` with every domain token replaced by padding, so the bare backbone can embed it (same shape)."""
    input_ids = batch["input_ids"].clone()
    input_ids[input_ids >= model.config.backbone_vocab_size] = model.tokenizer.pad_token_id
    return {**batch, "input_ids": input_ids}


# The `hub_server` fixture: a local Hugging Face Hub on 127.0.0.1 that huggingface_hub talks to (see hub_server.py).
pytest_plugins = ["hub_server"]
