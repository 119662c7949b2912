"""LoRA uptraining: data packing, losses, resume, failure handling, fuse, data parallelism."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import mlx_linear
from mlx_linear.convert import convert
from mlx_linear.errors import Interrupted, UserError
from mlx_linear.train import TrainConfig, load_source, train
from mlx_linear.train import trainer as trainer_module
from mlx_linear.train.data import Encoder, Packer, documents, sequences
from mlx_linear.train.losses import make_loss
from mlx_linear.train.trainer import validate, validation_sets

WORDS = "the thin cat sat on a mat while in the house then the rain came in".split()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    text = [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))))} for _ in range(60)]
    chat = [
        {"messages": [{"role": "user", "content": f"count to {i}"}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]}
        for i in range(1, 40)
    ]
    return {"text": write_jsonl(root / "text.jsonl", text), "chat": write_jsonl(root / "chat.jsonl", chat)}


@pytest.fixture(scope="module")
def tiny_liger(hf_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("liger") / "m"
    return convert(out, hf_source=str(hf_checkpoints["llama"]), window=8, log=lambda m: None)


def small_config(**overrides):
    base = dict(seq_len=32, batch_size=2, grad_accumulation=2, iters=4, learning_rate=1e-2, val_every=2, val_sequences=2)
    return TrainConfig(**{**base, **overrides})


# Data


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_source(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_source(tmp_path / "empty.jsonl")


def test_held_out_split_is_deterministic_and_disjoint(data):
    a, b = load_source(data["text"]), load_source(data["text"])
    assert a.valid == b.valid and len(a.valid) >= 1
    assert not any(v in a.train for v in a.valid) and len(a.train) + len(a.valid) == 60


def test_packing_concatenates_documents_in_seeded_order(data, tiny_liger):
    _, tokenizer = mlx_linear.load(tiny_liger)
    source = load_source(data["text"])
    encode = Encoder(tokenizer, "text")
    stream = [t for _, (_, (doc, _)) in zip(range(30), documents(source.train, encode, seed=0)) for t in doc]
    packed = list(zip(range(5), sequences([source], tokenizer, 32, seed=0)))
    for i, (_, (tokens, mask)) in enumerate(packed):
        assert len(tokens) == 33 and all(mask)
        assert tokens == stream[32 * i : 32 * i + 33]  # one token overlaps between sequences


def test_chat_loss_mask_covers_the_response_only(data, tiny_liger):
    _, tokenizer = mlx_linear.load(tiny_liger)
    record = json.loads(data["chat"].read_text().splitlines()[5])
    tokens, mask = Encoder(tokenizer, "chat")(record)
    prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
    assert tokens[: len(prompt)] == prompt
    assert not any(mask[: len(prompt)]) and all(mask[len(prompt) :])


def test_long_chat_examples_are_truncated_and_counted_once(data, tiny_liger):
    _, tokenizer = mlx_linear.load(tiny_liger)
    source = load_source(data["chat"])
    packer = Packer(16)
    docs = documents(source.train[:3], Encoder(tokenizer, "chat"), seed=0, epochs=4)
    assert all(len(t) == 17 for t, _ in packer.pack(docs, truncate=True))
    lengths = [len(Encoder(tokenizer, "chat")(r)[0]) for r in source.train[:3]]
    assert packer.truncated == sum(n > 17 for n in lengths) > 0


def test_mixing_weights(data, tiny_liger):
    _, tokenizer = mlx_linear.load(tiny_liger)
    text, chat = load_source(data["text"], weight=1.0), load_source(data["chat"], weight=0.0)
    for _, (tokens, mask) in zip(range(10), sequences([text, chat], tokenizer, 32)):
        assert all(mask)  # only the text source, whose every token is a target


# Losses


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_against_numpy(tiny_liger):
    model, _ = mlx_linear.load(tiny_liger)
    tokens = mx.random.randint(0, 300, (2, 13))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = mx.array(np.random.default_rng(0).random((2, 12)) > 0.3)
    student = log_softmax(model(inputs))
    with model.teacher():
        teacher = log_softmax(model(inputs))
    t, m = np.array(targets), np.array(mask)
    ce = -np.take_along_axis(student, t[..., None], -1)[..., 0]
    kl = (np.exp(teacher) * (teacher - student)).sum(-1)
    loss_sum, norm, ce_sum, ce_n = make_loss()(model, inputs, targets, mask)
    assert np.isclose(loss_sum.item(), (ce * m).sum(), rtol=1e-4) and norm.item() == m.sum()
    loss_sum, norm, ce_sum, _ = make_loss("distill", ce_weight=0.25)(model, inputs, targets, mask)
    assert np.isclose(loss_sum.item(), 0.75 * kl.sum() + 0.25 * (ce * m).sum(), rtol=1e-4) and norm.item() == 24
    assert kl.min() >= 0 and np.isclose(ce_sum.item(), (ce * m).sum(), rtol=1e-4)


# Training


def run_train(model_path, sources, out, config, **kwargs):
    model, tokenizer = mlx_linear.load(model_path)
    state = train(model, tokenizer, sources, config, out, log=lambda m: None, **kwargs)
    return state, mx.load(str(out / "last.safetensors"))


@pytest.mark.parametrize("method", ["liger-gla", "liger-hgrn2", "liger-gsa"])
def test_training_lowers_the_loss(data, tiny_liger, hf_checkpoints, tmp_path, method):
    if method != "liger-gla":  # with a softmax layer too (Liger-H)
        tiny_liger = convert(tmp_path / "m", hf_source=str(hf_checkpoints["llama"]), window=8, method=method,
                             full_attention_every=2, log=lambda m: None)
    state, _ = run_train(tiny_liger, [load_source(data["text"])], tmp_path / "a", small_config(iters=12, val_every=12))
    vals = [e["val"]["all"]["ce"] for e in state["log"] if "val" in e]
    assert vals[-1] < vals[0] - 0.5
    for name in ("adapters.safetensors", "adapter_config.json", "log.csv", "loss.png", "state.json"):
        assert (tmp_path / "a" / name).is_file()
    # The saved best adapter loads back and reproduces its validation loss.
    model, tokenizer = mlx_linear.load(tiny_liger, adapter_path=tmp_path / "a")
    val_sets = validation_sets([load_source(data["text"])], tokenizer, small_config())
    reloaded = validate(model, make_loss(), val_sets, rank=0, world=1)
    best = min(vals)
    assert abs(reloaded["all"]["ce"] - best) < 1e-4


def test_supra_trains_its_feature_maps(data, hf_checkpoints, tmp_path):
    """SUPRA's new parameters convert at the identity, train with the LoRA weights (lowering
    the loss) and come back with the adapter."""
    model_path = convert(tmp_path / "supra", hf_source=str(hf_checkpoints["llama"]), method="supra", log=lambda m: None)
    state, saved = run_train(model_path, [load_source(data["text"])], tmp_path / "a", small_config(iters=8, val_every=8))
    vals = [e["val"]["all"]["ce"] for e in state["log"] if "val" in e]
    assert vals[-1] < vals[0] - 0.5
    key = "model.layers.0.self_attn.method.q_feature.weight"
    assert saved[key].shape == (64, 64) and not mx.allclose(saved[key], mx.eye(64), atol=1e-3).item()
    model, _ = mlx_linear.load(model_path, adapter_path=tmp_path / "a")
    saved = mx.load(str(tmp_path / "a" / "adapters.safetensors"))[key]
    assert mx.array_equal(model.layers[0].self_attn.method.q_feature.weight, saved).item()


def test_resume_equals_an_uninterrupted_run(data, tiny_liger, tmp_path):
    sources = [load_source(data["text"]), load_source(data["chat"])]
    _, straight = run_train(tiny_liger, sources, tmp_path / "straight", small_config(iters=4))
    run_train(tiny_liger, sources, tmp_path / "resumed", small_config(iters=2))
    state, resumed = run_train(tiny_liger, sources, tmp_path / "resumed", small_config(iters=4), resume=True)
    assert state["update"] == 4
    for k in straight:
        assert mx.allclose(straight[k], resumed[k], atol=1e-6).item(), k


def test_ctrl_c_saves_and_resumes(data, tiny_liger, tmp_path, monkeypatch):
    real_update = trainer_module.Trainer.update

    def interrupted_update(self, data):
        if self.run.state["update"] == 2:
            raise KeyboardInterrupt
        return real_update(self, data)

    monkeypatch.setattr(trainer_module.Trainer, "update", interrupted_update)
    with pytest.raises(Interrupted, match="--resume"):
        run_train(tiny_liger, [load_source(data["text"])], tmp_path / "r", small_config())
    assert json.loads((tmp_path / "r" / "state.json").read_text())["update"] == 2
    monkeypatch.setattr(trainer_module.Trainer, "update", real_update)
    state, _ = run_train(tiny_liger, [load_source(data["text"])], tmp_path / "r", small_config(), resume=True)
    assert state["update"] == 4


def test_non_finite_loss_stops_with_the_last_good_adapter(data, tiny_liger, tmp_path):
    with pytest.raises(UserError, match="the loss became"):
        run_train(tiny_liger, [load_source(data["text"])], tmp_path / "n", small_config(learning_rate=1e38))
    saved = mx.load(str(tmp_path / "n" / "last.safetensors"))
    assert all(mx.isfinite(w).all().item() for w in saved.values())
    # Only the initial weights (lora_b = 0) gave a finite loss before the blow-up.
    assert all(mx.all(w == 0).item() for k, w in saved.items() if k.endswith("lora_b"))


def test_qlora_and_fuse(data, hf_checkpoints, tmp_path):
    quantized = convert(tmp_path / "q", hf_source=str(hf_checkpoints["llama"]), window=8, quantize=True,
                        q_bits=8, q_group_size=32, log=lambda m: None)
    state, _ = run_train(quantized, [load_source(data["text"])], tmp_path / "qa", small_config(iters=6, val_every=6))
    vals = [e["val"]["all"]["ce"] for e in state["log"] if "val" in e]
    assert vals[-1] < vals[0]
    tokens = mx.array([[5, 9, 33, 2, 17, 8, 44, 61]])
    with_adapter, _ = mlx_linear.load(quantized, adapter_path=tmp_path / "qa")
    expected = with_adapter(tokens)
    from mlx_linear.train.fuse import fuse

    fused, _ = mlx_linear.load(fuse(quantized, tmp_path / "qa", tmp_path / "fused", dequantize=True, log=lambda m: None))
    assert "quantization" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    assert mx.allclose(fused(tokens), expected, atol=1e-3).item()


# Command line and data parallelism


def cli(*args, launcher=()):
    return subprocess.run([*launcher, sys.executable, "-m", "mlx_linear", *args], capture_output=True, text=True, timeout=600)


def test_cli_bad_input(data, tiny_liger, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\nnot json\n')
    result = cli("lora-train", "--model", str(tiny_liger), "--data", str(bad), "--iters", "1", "-o", str(tmp_path / "o"))
    assert result.returncode != 0 and "bad.jsonl:3" in result.stderr.strip().splitlines()[-1]
    result = cli("lora-train", "--model", str(tmp_path), "--data", str(data["text"]), "--iters", "1", "-o", str(tmp_path / "o"))
    assert result.returncode != 0 and "not a converted model" in result.stderr
    result = cli("lora-train", "--model", str(tiny_liger), "--data", str(data["text"]), "-o", str(tmp_path / "o"))
    assert result.returncode != 0 and "--tokens" in result.stderr


SCRIPT = """
import json, sys
import mlx_linear
from mlx_linear.train import TrainConfig, load_source, train
model, tokenizer = mlx_linear.load(sys.argv[1])
config = TrainConfig(seq_len=32, batch_size=2, grad_accumulation=2, iters=2, learning_rate=1e-2, val_every=2, val_sequences=2)
state = train(model, tokenizer, [load_source(sys.argv[2])], config, sys.argv[3], log=lambda m: None)
"""


def test_two_ranks_equal_one_process(data, tiny_liger, tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    args = [str(tiny_liger), str(data["text"])]
    single = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    launch = ["mlx.launch", "--backend", "ring", "-n", "2", "--", sys.executable, str(script), *args, str(tmp_path / "two")]
    double = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr
    one, two = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("one", "two"))
    losses = [[e["loss"] for e in s["log"] if "loss" in e] for s in (one, two)]
    assert np.allclose(losses[0], losses[1], rtol=1e-5)
    a, b = (mx.load(str(tmp_path / d / "last.safetensors")) for d in ("one", "two"))
    assert all(mx.allclose(a[k], b[k], atol=1e-5).item() for k in a)


def test_attention_transfer_loss_against_layer_by_layer_oracle(hf_checkpoints, tiny_liger):
    """The original model run block by block gives each layer's input and softmax output."""
    from mlx_lm.utils import load_model

    model, _ = mlx_linear.load(tiny_liger)
    original, _ = load_model(hf_checkpoints["llama"])
    tokens = mx.random.randint(0, 300, (1, 24))
    h, expected = original.model.embed_tokens(tokens), 0.0
    for block, ours in zip(original.model.layers, model.layers):
        x = block.input_layernorm(h)
        y = block.self_attn(x, mask="causal")
        expected += mx.square(ours.self_attn(x) - y).mean(-1).sum().item()
        h = h + y
        h = h + block.mlp(block.post_attention_layernorm(h))
    total, norm, _, _ = make_loss("transfer")(model, tokens, tokens, mx.ones(tokens.shape, dtype=mx.bool_))
    assert np.isclose(total.item(), expected, rtol=1e-4) and norm.item() == 24 * len(model.layers)


@pytest.mark.parametrize("method,options", [("lolcats", {}), ("lola", {"slots": 4}),
                                            ("liger-gla", {"feature_proj": True, "learned_mix": True})])
def test_attention_transfer_then_cross_entropy(hf_checkpoints, tmp_path, method, options):
    """Stage 1 trains only the method's parameters to fit the softmax attention outputs of a
    repeated text; stage 2 adds LoRA and starts from stage 1's parameters."""
    model = convert(tmp_path / "m", hf_source=str(hf_checkpoints["llama"]), window=8, method=method, options=options,
                    log=lambda m: None)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(WORDS * 6)}] * 4)
    sources = [load_source(text)]
    config = small_config(objective="transfer", iters=16, grad_accumulation=1, val_every=16, method_lr=3e-2)
    state, stage1 = run_train(model, sources, tmp_path / "at", config)
    vals = [e["val"]["all"] for e in state["log"] if "val" in e]
    assert vals[-1]["loss"] < 0.8 * vals[0]["loss"] and vals[0]["ce"] > 0
    assert stage1 and all(".method." in k for k in stage1)  # no LoRA in stage 1
    state, stage2 = run_train(model, sources, tmp_path / "ce", small_config(init_adapter=str(tmp_path / "at"), iters=1))
    first_val = next(e["val"]["all"]["ce"] for e in state["log"] if "val" in e)
    assert abs(first_val - vals[-1]["ce"]) < 1e-4  # stage 2 starts from stage 1's best parameters
    assert any("lora_a" in k for k in stage2)


def test_attention_transfer_needs_method_parameters(tiny_liger, tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(WORDS * 3)}] * 4)
    with pytest.raises(UserError, match="nothing to train"):
        run_train(tiny_liger, [load_source(text)], tmp_path / "at", small_config(objective="transfer"))


def test_gradient_checkpointing_changes_nothing(data, tiny_liger, tmp_path, monkeypatch):
    block = type(mlx_linear.load(tiny_liger)[0].layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # restored after the test
    sources = [load_source(data["text"])]
    _, plain = run_train(tiny_liger, sources, tmp_path / "plain", small_config(iters=2))
    _, checkpointed = run_train(tiny_liger, sources, tmp_path / "ckpt", small_config(iters=2, grad_checkpoint=True))
    assert all(mx.allclose(plain[k], checkpointed[k], atol=1e-5).item() for k in plain)


# Data that cannot train, and settings that would train nonsense: one line, no folder left


def chat_record(user_words, reply="a mat"):
    return {"messages": [{"role": "user", "content": " ".join(WORDS[:user_words])}, {"role": "assistant", "content": reply}]}


def no_nan(text):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in state.json"))


def test_updates_without_trainable_tokens_are_skipped(tiny_liger, tmp_path):
    """Chat prompts longer than --seq-len leave no reply to train on: such updates are skipped."""
    folder = tmp_path / "chat"
    folder.mkdir()
    # 30 and 72 tokens: the reply of the long ones is past the 41 tokens of a sequence
    write_jsonl(folder / "train.jsonl", [chat_record(2), chat_record(14), chat_record(14), chat_record(14)])
    write_jsonl(folder / "valid.jsonl", [chat_record(2)])
    config = small_config(seq_len=40, batch_size=1, grad_accumulation=1, iters=6, val_every=3)
    state, weights = run_train(tiny_liger, [load_source(folder)], tmp_path / "o", config)
    assert state["update"] == 6 and state["skipped_updates"] > 0
    assert all(mx.isfinite(w).all().item() for w in weights.values())
    saved = no_nan((tmp_path / "o" / "state.json").read_text())
    losses = [e["loss"] for e in saved["log"] if "loss" in e]
    assert len(losses) == 6 and all(0 < loss < 100 for loss in losses) and saved["best_val"] > 0

    write_jsonl(folder / "valid.jsonl", [chat_record(14)])
    with pytest.raises(UserError, match="no trainable token within --seq-len 40"):
        run_train(tiny_liger, [load_source(folder)], tmp_path / "v", config)
    write_jsonl(folder / "train.jsonl", [chat_record(14)] * 3)
    write_jsonl(folder / "valid.jsonl", [chat_record(2)])
    with pytest.raises(UserError, match="updates in a row had no trainable token"):
        run_train(tiny_liger, [load_source(folder)], tmp_path / "e", config)
    assert not (tmp_path / "v").exists() and not (tmp_path / "e").exists()


def test_non_finite_gradients_stop_the_run(data, tiny_liger, tmp_path, monkeypatch):
    real_micro_step = trainer_module.Trainer.micro_step

    def infinite_gradients(self, *batch):
        values, grads = real_micro_step(self, *batch)
        return values, tree_map(lambda g: g * np.inf, grads)

    monkeypatch.setattr(trainer_module.Trainer, "micro_step", infinite_gradients)
    with pytest.raises(UserError, match="gradients became infinite or NaN at update 1"):
        run_train(tiny_liger, [load_source(data["text"])], tmp_path / "g", small_config(iters=1))
    saved = mx.load(str(tmp_path / "g" / "last.safetensors"))
    assert all(mx.isfinite(w).all().item() for w in saved.values())


@pytest.fixture(scope="module")
def no_template(tiny_liger, tmp_path_factory):
    import shutil

    folder = shutil.copytree(tiny_liger, tmp_path_factory.mktemp("plain") / "m")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def in_process(*args):
    from click.testing import CliRunner

    from mlx_linear.cli import cli as group

    return CliRunner().invoke(group, list(map(str, args)))


@pytest.mark.parametrize("records,words", [
    ([{"text": 5}] * 3, ["record 1", "'text' must be a string"]),
    ([{"text": ""}] * 10, ["record 1", "'text' is empty"]),
    ([{"messages": "hello"}] * 3, ["record 1", "'messages' must be a list"]),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 3, ["record 1", "no assistant message"]),
    ([chat_record(2)] * 3, ["chat template"]),
    ([{"text": "fine"}] * 3, ["unknown LoRA targets ['x']"], ),
    ([{"text": "fine"}] * 3, ["--learning-rate -1", "positive"]),
    ([{"text": "fine"}] * 3, ["--weight-decay -5", "non-negative"]),
    ([{"text": "fine"}] * 3, ["--lora-alpha", "-1", "positive"]),
])
def test_untrainable_input_leaves_nothing(no_template, tmp_path, records, words):
    flags = {"x']": ["--lora-targets", "q,x"], "--learning-rate -1": ["--learning-rate", "-1"],
             "--weight-decay -5": ["--weight-decay", "-5"], "--lora-alpha": ["--lora-alpha", "-8"]}
    extra = next((v for k, v in flags.items() if k in words[0]), [])
    data = write_jsonl(tmp_path / "d.jsonl", records)
    args = ["lora-train", "--model", no_template, "--data", data, "--iters", 1, "--seq-len", 16, "-o", tmp_path / "o", *extra]
    for _ in range(2):  # and again: the first attempt left nothing that the rerun refuses
        result = in_process(*args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert all(word in result.output for word in words), result.output
        assert not (tmp_path / "o").exists()


def test_full_disk_while_training_keeps_what_was_saved(data, tiny_liger, tmp_path, monkeypatch):
    real_save = trainer_module.save_safetensors
    saves = []

    def fill_up_on_the_third_save(path, arrays):
        saves.append(path)
        if len(saves) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, arrays)

    monkeypatch.setattr(trainer_module, "save_safetensors", fill_up_on_the_third_save)
    with pytest.raises(UserError, match="the disk filled up while writing .*--resume"):
        run_train(tiny_liger, [load_source(data["text"])], tmp_path / "f", small_config(iters=4, val_every=2))
    state = json.loads((tmp_path / "f" / "state.json").read_text())  # the checkpoint of update 2 is intact
    assert state["update"] == 2 and (tmp_path / "f" / "last.safetensors").is_file()
