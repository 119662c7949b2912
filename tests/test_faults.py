"""Faults a new user meets: damaged files, unwritable outputs, a model too big for memory,
mlx-lm interop. Each is one line naming the file and the fix, a non-zero exit, nothing lost."""

import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

import mlx_linear
from mlx_linear import _blas
from mlx_linear.adapters import apply_lora, lora_config, save_adapter
from mlx_linear.cli import cli
from mlx_linear.convert import convert


@pytest.fixture(scope="module")
def liger(hf_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "liger"
    options = {"feature_proj": True, "learned_mix": True}  # method parameters that train with the adapter
    return convert(out, hf_source=str(hf_checkpoints["llama"]), window=8, options=options, log=lambda m: None)


@pytest.fixture(scope="module")
def adapter(liger, tmp_path_factory):
    """An adapter whose LoRA weights and method parameters all moved away from their start."""
    model, _ = mlx_linear.load(liger)
    config = lora_config(model, rank=4)
    apply_lora(model, config)
    mx.random.seed(3)
    moved = [(k, v + 0.3 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(moved))
    folder = tmp_path_factory.mktemp("faults") / "adapter"
    save_adapter(folder, model, config)
    return folder


@pytest.fixture
def immutable(tmp_path):
    """A folder nobody (root included) can write into."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)])


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(map(str, args)), input=input)


def assert_one_line_error(result, *words):
    assert result.exit_code == 1 and result.output.startswith("Error:") and result.output.count("\n") == 1, result.output
    for word in words:
        assert word in result.output, result.output


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_model_files(liger, tmp_path):
    damaged = shutil.copytree(liger, tmp_path / "m")
    truncate(damaged / "model.safetensors")
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        assert_one_line_error(invoke(*command, "--model", damaged), "model.safetensors", "convert the model again")


def test_damaged_adapter_files(liger, adapter, tmp_path):
    damaged = shutil.copytree(adapter, tmp_path / "a")
    truncate(damaged / "adapters.safetensors")
    generate = ["generate", "--model", liger, "--prompt", "hi", "--adapter", damaged]
    fuse = ["fuse", "--model", liger, "--adapter", damaged, "-o", tmp_path / "fused"]
    for command in (generate, fuse):
        assert_one_line_error(invoke(*command), "adapters.safetensors", "again")
    for text, words in (('{"num_layers": 2', ["malformed"]), ('{"num_layers": 2}', ["lacks", "lora_parameters"])):
        (damaged / "adapter_config.json").write_text(text)
        for command in (generate, fuse):
            assert_one_line_error(invoke(*command), "adapter_config.json", *words)
    assert not (tmp_path / "fused").exists()


def test_mlx_lm_generate_loads_our_adapters(liger, adapter):
    ours = invoke("generate", "--model", liger, "--adapter", adapter, "--prompt", "hello", "--max-tokens", 12)
    assert ours.exit_code == 0, ours.output
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(liger), "--trust-remote-code", "--adapter-path",
         str(adapter), "--prompt", "hello", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ours.stdout.splitlines()[0] in result.stdout
    without = invoke("generate", "--model", liger, "--prompt", "hello", "--max-tokens", 12)
    assert without.stdout != ours.stdout  # the adapter changes the reply


def test_model_too_big_for_memory_is_refused_before_loading(liger, monkeypatch):
    float32_bytes = sum(w.size * 4 for w in mx.load(str(liger / "model.safetensors")).values())
    monkeypatch.setattr(mlx_linear.utils, "available_memory", lambda: float32_bytes - 1)
    assert_one_line_error(invoke("generate", "--model", liger, "--prompt", "hi"), "float32", "--quantize")
    monkeypatch.setattr(mlx_linear.utils, "available_memory", lambda: float32_bytes)
    assert invoke("generate", "--model", liger, "--prompt", "hi", "--max-tokens", 2).exit_code == 0


def test_chat_command_failures_keep_the_conversation(liger, immutable, tmp_path, monkeypatch):
    def broken(session):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr("mlx_linear.chat.cli.format_stats", broken)
    lines = ["hello", f"/save {immutable / 'conversation'}", "/stats", f"/save {tmp_path / 'conversation'}"]
    result = invoke("chat", "--model", liger, "--max-tokens", 5, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 2 and "cannot write" in errors[0] and "writable folder" in errors[0], result.output
    assert "/stats failed (RuntimeError: something unforeseen)" in errors[1]
    assert (tmp_path / "conversation.safetensors").is_file()  # the conversation was still there to save


def test_unwritable_outputs_fail_before_the_work(liger, adapter, tmp_path, immutable):
    (tmp_path / "file").write_text("")
    for where, words in ((tmp_path / "file", ["is a file"]), (immutable, ["not writable"])):
        commands = [
            ["convert", "--hf", tmp_path / "absent", "-o", where / "o"],  # the output is checked before the source
            ["fuse", "--model", liger, "--adapter", adapter, "-o", where / "o"],
            ["lora-train", "--model", tmp_path / "absent", "--data", tmp_path / "absent", "--iters", 1, "-o", where / "o"],
            ["eval", "--model", tmp_path / "absent", "--tasks", "nope", "-o", where / "o.json"],
        ]
        for command in commands:
            assert_one_line_error(invoke(*command), str(where / "o"), *words)


def test_a_sink_horizon_without_sinks_or_inside_the_window_is_refused(hf_checkpoints, tmp_path):
    source = ["convert", "--hf", hf_checkpoints["llama"], "--window", 8]
    assert_one_line_error(invoke(*source, "--sink-horizon", 100, "-o", tmp_path / "a"), "needs sinks", "--sinks N")
    assert_one_line_error(invoke(*source, "--sinks", 2, "--sink-horizon", 5, "-o", tmp_path / "b"), "inside the window", "(9)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert invoke(*source, "--sinks", 2, "--sink-horizon", 9, "-o", tmp_path / "c").exit_code == 0


def test_importing_mlx_first_warns_about_the_lost_blas(monkeypatch, capsys):
    assert "mlx.core" in sys.modules
    monkeypatch.setattr(_blas, "CANDIDATES", ("libnot-a-blas.so", "libm.so.6"))  # libm stands in for OpenBLAS
    assert _blas.use_system_blas() is None
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "import mlx_linear first" in warning and "LD_PRELOAD=libm.so.6" in warning
    monkeypatch.setattr(_blas, "CANDIDATES", ("libnot-a-blas.so",))
    assert _blas.use_system_blas() is None and capsys.readouterr().err == ""  # no OpenBLAS: nothing to lose


def test_full_disk_at_the_end_of_eval_keeps_the_table(liger, tmp_path, monkeypatch):
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext2" / "wiki.test.raw.lf.txt").write_text(" = T = \n the thin cat sat in the house . \n" * 4)

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mlx_linear.eval.cli.write_json", full)
    result = invoke("eval", "--model", liger, "--tasks", "wikitext2", "--data-dir", tmp_path / "data", "--window", 16,
                    "--limit", 1, "-o", tmp_path / "r.json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the disk filled up while writing")
    assert "| wikitext2 | ppl |" in result.stdout  # the results were printed before the write failed
