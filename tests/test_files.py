"""Outputs written beside the target and renamed: complete or absent, with a plain write's permissions."""

import os
import stat

import mlx.core as mx
import pytest

from mlx_linear.files import atomic_file, atomic_output, save_safetensors, write_json
from mlx_linear.plot import line_plot


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # the oracle: what open() gives under this umask
    write_json(tmp_path / "r.json", {"a": 1})
    save_safetensors(tmp_path / "w.safetensors", {"x": mx.zeros((2,))})
    line_plot(tmp_path / "loss.png", [{"x": "step", "y": "loss", "series": {"a": ([1, 2], [3, 4])}}])
    for name in ("r.json", "w.safetensors", "loss.png"):
        assert mode(tmp_path / name) == mode(plain), name
    assert mode(plain) == 0o666 & ~umask
    with atomic_output(tmp_path / "folder") as folder:
        (folder / "f").write_text("x")
    assert mode(tmp_path / "folder") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "loss.png", "plain.txt", "r.json", "w.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "old": true\n}\n' and os.listdir(tmp_path) == ["state.json"]
