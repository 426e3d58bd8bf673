import json
import subprocess
import sys

from domain_experts.cli import main


def test_info_lists_domains(setup, tmp_path, capsys):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domains"]["recipes"]["blocks"] == 2
    assert summary["domains"]["recipes"]["control_token"] == "<|domain:recipes|>"
    assert summary["backbone"]["layers"] == model.config.num_backbone_layers


def test_info_on_missing_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "domain_experts.cli", "info", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "error" in result.stderr
