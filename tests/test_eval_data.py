"""Evaluation data: a local folder wins, else the hub's copy (fetched from a stand-in hub on
127.0.0.1, then read from the HF cache offline); the full benchmark files when present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_linear
from mlx_linear.convert import convert
from mlx_linear.errors import UserError
from mlx_linear.eval import evaluate
from mlx_linear.eval.tasks import Task, get_task
from mlx_linear.hub import HubFile

from conftest import full_data_dir
from fake_hub import NO_TELEMETRY, fixture_files, serve

FIXTURES = Path(__file__).parent / "data"  # a few real records of each local file
HUB_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada", "wikitext2")


def local_records(relative):
    return [json.loads(line) for line in (FIXTURES / relative).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def hub_paths(tmp_path_factory):
    """{(repo, filename): local copy} of the stand-in hub's files, for reading them directly."""
    root = tmp_path_factory.mktemp("hubfiles")
    paths = {}
    for (repo, _, filename), data in fixture_files().items():
        path = root / repo / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[repo, filename] = path
    return paths


def test_the_tasks_read_the_files_lm_eval_reads():
    served = {(repo, filename) for repo, _, filename in fixture_files()}
    tasks = {name: get_task(name).hub for name in (*HUB_TASKS, "mmlu_cloze")}
    assert {(h.repo, h.filename) for h in tasks.values()} == served
    assert tasks["hellaswag"].revision == "refs/convert/parquet" and tasks["piqa"].revision is None


def test_hub_rows_read_as_the_local_records(hub_paths):
    def read(name):
        task = get_task(name)
        return list(task.read_hub(hub_paths[task.hub.repo, task.hub.filename]))

    labels = [int(n) for n in (FIXTURES / "piqa/valid-labels.lst").read_text().split()]
    piqa = [{**d, "label": n} for d, n in zip(local_records("piqa/valid.jsonl"), labels)]
    assert read("piqa") == piqa[:3]
    arc = [{k: d[k] for k in ("question", "choices", "answer_idx")} for d in local_records("arc/arc_easy_test.jsonl")]
    assert read("arc_easy") == arc  # the third labels its choices 1-4, not A-D
    assert [d["answer_idx"] for d in read("arc_challenge")] == [2, 1]
    # lm-eval capitalizes ctx_b; the local copy does not.
    hellaswag = local_records("hellaswag/hellaswag_val.preprocessed.jsonl")
    queries = ["Roof shingle removal: A man is sitting on a roof. He",
               "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
               "Canoeing: Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
               "water, with other individuals visible in the background. The child and a different man"]
    got = read("hellaswag")
    assert [d["query"] for d in got] == queries
    assert [(d["endings"], int(d["label"])) for d in got] == [(d["endings"], d["label"]) for d in hellaswag]
    assert read("lambada") == local_records("lambada/lambada_test.jsonl")
    assert get_task("wikitext2").read_hub(hub_paths["Salesforce/wikitext", get_task("wikitext2").hub.filename]) == (
        FIXTURES / "wikitext2/wiki.test.raw.lf.txt"
    ).read_text(encoding="utf-8")


def test_a_local_folder_wins_and_a_missing_task_falls_back_to_the_hub(monkeypatch):
    def offline(self, what, fix):
        raise UserError(f"{what}: offline: {fix}")

    monkeypatch.setattr(HubFile, "download", offline)
    for name in ("piqa", "arc_easy", "hellaswag", "lambada", "wikitext2"):
        get_task(name).check(FIXTURES)  # all local: the hub is not asked
    with pytest.raises(UserError, match=r"^winogrande: offline: .*--data-dir DIR holding winogrande/"):
        get_task("winogrande").check(FIXTURES)


def test_a_task_that_reads_no_files_needs_no_folder():
    class Synthetic(Task):
        name = "synthetic"

    Synthetic().check(None)
    Synthetic().check(FIXTURES)
    assert Synthetic().source(None) == "synthetic"
    assert get_task("piqa").source(None) == "baber/piqa/piqa_validation.parquet"
    assert get_task("piqa").source(FIXTURES) == str(FIXTURES / "piqa/valid.jsonl")


@pytest.fixture(scope="module")
def tiny_liger(hf_checkpoints, tmp_path_factory):
    return convert(tmp_path_factory.mktemp("m") / "liger", hf_source=str(hf_checkpoints["llama"]), window=8,
                   log=lambda m: None)


def run_eval(model, out, env):
    args = ["--model", model, "--tasks", ",".join(HUB_TASKS), "--limit", "2", "--window", "16", "-o", out]
    env = {k: v for k, v in {**os.environ, **NO_TELEMETRY, **env}.items() if k not in ("MLX_LINEAR_DATA", "HF_HUB_CACHE")}
    return subprocess.run([sys.executable, "-m", "mlx_linear", "eval", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_eval_fetches_from_the_hub_once_then_reads_the_cache_offline(tiny_liger, hub_paths, tmp_path, monkeypatch):
    home = {"HF_HOME": str(tmp_path / "hf")}
    with serve(fixture_files()) as (endpoint, requests):
        online = run_eval(tiny_liger, tmp_path / "online.json", {**home, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"})
        assert online.returncode == 0, online.stderr
        fetched = {path for method, path in requests if method == "GET" and "/resolve/" in path}
    assert len(fetched) == len(HUB_TASKS)
    offline = run_eval(tiny_liger, tmp_path / "offline.json", {**home, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    online, offline = (json.loads((tmp_path / f"{n}.json").read_text())["model"] for n in ("online", "offline"))
    assert offline == online and set(online) == set(HUB_TASKS)
    # The oracle: the same files read directly, in this process.
    monkeypatch.setattr(HubFile, "download", lambda self, what, fix: hub_paths[self.repo, self.filename])
    model, tokenizer = mlx_linear.load(tiny_liger)
    direct = evaluate(model, tokenizer, HUB_TASKS, limit=2, window=16, progress=False)
    assert set(direct) == set(online)
    for name, metrics in direct.items():
        assert online[name] == pytest.approx(metrics, rel=1e-4), name  # float32 sums in another process


def test_offline_with_nothing_cached_is_one_line_naming_task_dataset_and_data_dir(tiny_liger, tmp_path):
    result = run_eval(tiny_liger, tmp_path / "r.json", {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: piqa (baber/piqa/piqa_validation.parquet): not in the Hugging Face cache")
    assert "--data-dir" in lines[0]


# The full benchmark files (../shared/data beside the project in CI; skipped elsewhere).

FULL_COUNTS = {"piqa": 1838, "arc_easy": 2376, "hellaswag": 10042, "lambada": 5153}


@pytest.mark.parametrize("name", FULL_COUNTS)
def test_full_benchmark_files_read_completely(name):
    root = full_data_dir()
    documents = list(get_task(name).read_local(root))
    assert len(documents) == FULL_COUNTS[name]
    assert local_records(get_task(name).files[0])[0].items() <= documents[0].items()  # the fixture is their head
