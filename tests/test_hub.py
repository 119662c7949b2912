"""Hub failures are said by kind, against a stand-in hub on 127.0.0.1: a missing repository is
not called offline."""

import os
import subprocess
import sys

from fake_hub import NO_TELEMETRY, serve


def test_a_missing_hub_model_is_not_found_not_offline(tmp_path):
    env = {**os.environ, **NO_TELEMETRY, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    with serve({}) as (endpoint, _):
        result = subprocess.run([sys.executable, "-m", "mlx_linear", "convert", "--hf", "nobody/no-such-model",
                                 "-o", str(tmp_path / "o")], env={**env, "HF_ENDPOINT": endpoint},
                                capture_output=True, text=True, timeout=120)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert error.startswith("Error: cannot download nobody/no-such-model from the Hugging Face hub: not found on the hub")
    assert "--hf" in error and not (tmp_path / "o").exists()
