"""The FSDP and DeepSpeed configurations of examples/ (issue 16): valid Accelerate configs that wrap what they should.

Accelerate runs FSDP on GPUs only (its state picks FSDP for multi-GPU device types; a CPU run is MULTI_CPU, data
parallel), although torch's FSDP2 itself runs on CPU with gloo. So on a machine without GPUs, the test checks that a
launch with the FSDP config stops with a clear error instead of silently training data parallel; with GPUs it trains on
2 processes (1 with a single GPU) and matches 1 process without FSDP, as the data-parallel test of test_train.py does.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from backbones import tiny_backbone, tiny_tokenizer
from safetensors.torch import load_file

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FSDP_CONFIG = EXAMPLES / "fsdp_config.yaml"
DEEPSPEED_CONFIG = EXAMPLES / "deepspeed_zero2_config.yaml"


def launch_environment(config_file: Path, tmp_path: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config_file` gives a process (read by a launched script)."""
    script = tmp_path / "environment.py"
    script.write_text("import json, os\nprint(json.dumps(dict(os.environ)))\n")
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                               "--num_processes", "1", str(script)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    return json.loads(launched.stdout.strip().splitlines()[-1])


def test_fsdp_config_shards_every_decoder_layer_and_expansion_block(monkeypatch, tmp_path):
    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    for name, value in launch_environment(FSDP_CONFIG, tmp_path).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):  # not the process group's RANK, MASTER_ADDR, ...
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as in each launched process
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"

    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("recipes", num_blocks=2)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [name for name, module in model.named_modules() if policy(module)]
    blocks = [name for name in units if name.startswith("domains.")]
    assert len(units) == model.config.num_backbone_layers + 2 and len(blocks) == 2, units
    # Each unit holds either frozen backbone tensors or the domain's trainable ones, never both.
    model.requires_grad_(False)
    model.domains["recipes"].requires_grad_(True)
    for name in units:
        flags = {p.requires_grad for p in model.get_submodule(name).parameters()}
        assert flags == {name.startswith("domains.")}, name


def test_deepspeed_config_is_a_zero_stage_2_accelerate_config():
    config = load_config_from_file(str(DEEPSPEED_CONFIG))
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["gradient_clipping"] == 1.0


def train_with(launcher: list[str], model_dir: Path, output_dir: Path) -> subprocess.CompletedProcess:
    args = ["train", "--model", str(model_dir), "--domain", "recipes", "--add-domain", "--num-blocks", "2",
            "--train-file", str(corpus_path("recipes", "validation")), "--output-dir", str(output_dir),
            "--block-size", "64", "--batch-size", "4", "--learning-rate", "1e-3", "--max-steps", "4",
            "--mixed-precision", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "domain_experts.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_fsdp_training_matches_one_process_or_says_it_needs_gpus(tmp_path):
    model_dir = tmp_path / "tiny"
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.save_pretrained(model_dir)
    gpus = torch.cuda.device_count()
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--mixed_precision", "no", "--num_processes", str(min(2, gpus) or 2)]
    sharded = train_with(fsdp, model_dir, tmp_path / "fsdp")
    if not gpus:
        assert sharded.returncode != 0
        assert ("The Accelerate config asks for FSDP, but Accelerate runs FSDP on GPUs only and this run got "
                "MULTI_CPU") in sharded.stdout + sharded.stderr
        assert not (tmp_path / "fsdp").exists(), "it stopped before writing anything"
        return
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = train_with([sys.executable], model_dir, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    losses = [json.loads((tmp_path / name / "model" / "eval_results.json").read_text())["eval_loss"]
              for name in ("one", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
