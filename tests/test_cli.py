import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import domain_experts
from domain_experts.cli import build_parser, main
from domain_experts.training_config import TrainingConfig, parse_training_config


def test_info_lists_domains(setup, tmp_path, capsys):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domains"]["recipes"]["blocks"] == 2
    assert summary["domains"]["recipes"]["control_token"] == "<|domain:recipes|>"
    assert summary["domains"]["recipes"]["control_embedding"] == "learned"  # the default with blocks
    assert summary["backbone"]["layers"] == model.config.num_backbone_layers


def test_info_on_missing_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "domain_experts.cli", "info", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "error" in result.stderr


def test_info_on_a_folder_that_is_no_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "holds no config.json, not a saved DomainExperts model" in capsys.readouterr().err


def all_parsers(parser: argparse.ArgumentParser, name: str = "domain-experts"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from all_parsers(subparser, f"{name} {command}")


def test_every_option_is_dashed_has_help_and_booleans_take_no_value():
    for name, parser in all_parsers(build_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag.startswith("-") and "_" not in flag, f"{name} {flag}"
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                assert action.nargs == 0


def test_train_flags_come_from_training_config():
    config = parse_training_config(["--output-dir", "out", "--model", "m", "--domain", "recipes", "--add-domain",
                                    "--no-packing", "--learning-rate", "1e-3", "--max-eval-samples", "7"])
    assert config == TrainingConfig(output_dir="out", model="m", domain="recipes", add_domain=True, packing=False,
                                    learning_rate=1e-3, max_eval_samples=7)
    train_parser = dict(all_parsers(build_parser()))["domain-experts train"]
    flags = {flag: action for action in train_parser._actions for flag in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainingConfig)} - {"--packing"} < set(flags)
    assert "--packing" not in flags and flags["--no-packing"].help.startswith("Truncate each text to one block")
    for wrong in (["--output_dir", "out"], ["--output-dir", "out", "--add-domain", "true"]):
        with pytest.raises(SystemExit):
            parse_training_config(wrong)
    # The token start's defaults are written twice (the command line does not import torch): they must agree.
    from domain_experts.token_init import TokenInitConfig

    assert (TrainingConfig.token_init_distill_steps, TrainingConfig.token_init_distill_length) == \
        (TokenInitConfig.distill_steps, TokenInitConfig.distill_length)


def test_help_keeps_the_line_breaks_of_its_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:\n  # add a 4-block `recipes` domain to SmolLM2-135M and train it\n" in help_text
    assert "--num-blocks 4 \\\n      --train-file recipes.train.jsonl" in help_text
    assert "--output_dir" not in help_text and "--no_packing" not in help_text


def test_the_command_line_imports_nothing_heavy_until_a_command_runs():
    # The package's own __init__ is skipped (as a lazy one would be): this checks what the CLI itself imports.
    code = textwrap.dedent(f"""
        import contextlib, io, sys, types
        package = types.ModuleType("domain_experts")
        package.__path__ = [{str(Path(domain_experts.__file__).parent)!r}]
        sys.modules["domain_experts"] = package
        from domain_experts.cli import main
        for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["augment", "--help"], ["serve", "--help"]):
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        print(sorted(m for m in ("torch", "transformers", "datasets", "accelerate", "evaluate") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_local_folder_is_reported_as_a_missing_folder(tmp_path, capsys):
    for location in (str(tmp_path / "nope"), "./nope", "runs/recipes/model"):
        with pytest.raises(SystemExit) as exit_info:
            main(["info", location])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"No such model folder: {location}" in error and "Repo id" not in error


def test_a_file_given_as_a_model_is_reported_as_a_file(tmp_path, capsys):
    data_file = tmp_path / "recipes.jsonl"
    data_file.write_text('{"text": "a recipe"}\n')
    for command in (["info", str(data_file)], ["eval", str(data_file), "--data", f"none={data_file}"],
                    ["serve", str(data_file)]):
        try:
            code = main(command)
        except SystemExit as exit_info:  # argparse's own error
            code = exit_info.code
        assert code == 2
        error = capsys.readouterr().err
        assert f"{data_file} is a file: give a model folder or a Hub repo id." in error, error


def test_counts_below_their_minimum_are_refused_by_the_parser(tmp_path, capsys):
    """`--max-length 0` measured nothing and `--max-samples -1` dropped each file's last text, without a word."""
    for command, message in [(["eval", str(tmp_path), "--data", "none=x.jsonl", "--max-length", "0"],
                              "argument --max-length: must be at least 2, got 0"),
                             (["eval", str(tmp_path), "--data", "none=x.jsonl", "--max-samples", "-1"],
                              "argument --max-samples: must be at least 1, got -1"),
                             (["train-gate", str(tmp_path), "--data", "none=x.jsonl", "--max-samples", "0",
                               "--output-dir", str(tmp_path / "out")], "argument --max-samples: must be at least 1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
