"""The command without the `cli` extra's packages: plots are skipped with a note; anything else that is missing is
one error line naming `pip install 'adapterkit[cli]'`, never a traceback.

Missing packages are simulated: in-process by a None entry in sys.modules, in a subprocess (for imports at module
top, typer's included) by a meta path finder that refuses the names before anything is imported.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HINT = "pip install 'adapterkit[cli]'"

# argv[1]: comma-separated top-level module names to make unimportable; argv[2:]: the command's arguments.
BOOTSTRAP = """
import sys
blocked = set(sys.argv[1].split(","))

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
from adapterkit.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def run_without(modules: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, modules, *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_the_bootstrap_really_blocks():
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP.replace("from adapterkit", "import typer\nfrom adapterkit"),
                           "typer", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'typer'" in proc.stderr


@pytest.mark.parametrize("module", ["typer", "rich"])
@pytest.mark.parametrize("args", [["--help"], ["inspect", "nowhere"], []], ids=["help", "inspect", "bare"])
def test_missing_cli_framework_is_one_line(module, args):
    proc = run_without(module, *args)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"error: the adapterkit command needs {module}, which is not installed: {HINT}\n"


def test_usage_errors_are_clicks_message_not_unexpected(cli):
    code, out, err = cli("train")
    assert code == 2 and out == ""
    assert "Error: Missing option '--out'" in err and "unexpected" not in err
    code, _, err = cli("no-such-command")
    assert code == 2 and "Error: No such command 'no-such-command'." in err


def test_usage_errors_need_no_click_where_typer_vendors_it():
    pytest.importorskip("typer._click")
    proc = run_without("click", "train")
    assert proc.returncode == 2, proc.stderr
    assert "Error: Missing option '--out'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_typer_with_debug_shows_the_traceback():
    proc = run_without("typer", "--debug", "--help")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "No module named 'typer'" in proc.stderr


@pytest.mark.parametrize("command", ["train", "verify", "generate", "merge"])
def test_missing_transformers_names_the_extra(command, tiny_model_dir, trained_adapter, chat_data, tmp_path):
    args = {
        "train": ["--model", tiny_model_dir, "--data", chat_data, "--out", tmp_path / "ad", "--max-steps", "1"],
        "verify": [trained_adapter, "--model", tiny_model_dir],
        "generate": ["hi", "--adapter", trained_adapter, "--model", tiny_model_dir],
        "merge": [trained_adapter, "--model", tiny_model_dir, "--out", tmp_path / "merged"],
    }[command]
    proc = run_without("transformers", command, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: this command needs transformers, which is not installed: {HINT}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ad").exists() and not (tmp_path / "merged").exists()


def test_inspect_plot_without_matplotlib_in_a_fresh_process(trained_adapter, tmp_path):
    plot = tmp_path / "norms.png"
    proc = run_without("matplotlib", "inspect", trained_adapter, "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    assert f"plot skipped: matplotlib is not installed ({HINT})" in proc.stdout.splitlines()
    assert "||ΔW|| total" in proc.stdout
    assert not plot.exists()
    assert proc.stderr == ""


def test_train_without_matplotlib_skips_only_the_plot(cli, monkeypatch, tmp_path, tiny_model_dir, chat_data):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ModuleNotFoundError
    out = tmp_path / "ad"
    code, stdout, stderr = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out,
                               "--max-steps", "2", "--batch-size", "4", "--r", "2")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert f"loss plot skipped: matplotlib is not installed ({HINT})" in lines
    saved = [line for line in lines if line.startswith("saved ")]
    assert len(saved) == 1 and "training.json" in saved[0] and "loss.png" not in saved[0]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "training.json"]


def test_inspect_without_plot_needs_no_matplotlib(cli, monkeypatch, trained_adapter):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, stdout, stderr = cli("inspect", trained_adapter)
    assert code == 0 and stderr == ""
    assert "matplotlib" not in stdout


def test_other_missing_module_is_still_unexpected(cli, monkeypatch, trained_adapter):
    import adapterkit.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'zzz_private'", name="zzz_private")

    monkeypatch.setattr(checkpoint, "read_adapter", broken)
    code, _, stderr = cli("inspect", trained_adapter)
    assert code == 1
    assert stderr == ("error: unexpected ModuleNotFoundError: No module named 'zzz_private' "
                      "(rerun with --debug for the traceback)\n")


def test_gguf_model_without_gguf_names_the_extra(cli, monkeypatch, tmp_path, chat_data):
    monkeypatch.setitem(sys.modules, "gguf", None)
    model = tmp_path / "model.Q4.gguf"
    model.write_bytes(b"GGUF")
    code, _, err = cli("train", "--model", model, "--data", chat_data, "--out", tmp_path / "ad")
    assert code == 1
    assert err == f"error: reading a GGUF model needs the gguf package, which is not installed: {HINT}\n"
    assert not (tmp_path / "ad").exists()
