"""The bundled model's cached conversion: keyed by method, options and package version; the
chat's default follows the adapter's conversion.json, method included."""

import json

import mlx_linear.chat.model as chat_model
import mlx_linear.convert.cache as cache


def conversions(monkeypatch, tmp_path):
    """The options of each conversion bundled_model asks for (none really runs)."""
    made = []
    monkeypatch.setenv("MLX_LINEAR_CACHE", str(tmp_path))

    def fake_convert(path, log, **options):
        made.append(options)
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    monkeypatch.setattr(cache, "convert", fake_convert)
    return made


def test_the_cache_is_reused_until_the_version_or_the_conversion_changes(monkeypatch, tmp_path):
    made = conversions(monkeypatch, tmp_path)
    first = cache.bundled_model("liger-gla", log=print, sinks=4)
    assert cache.bundled_model("liger-gla", log=print, sinks=4) == first and len(made) == 1
    assert len({first, cache.bundled_model("liger-gla", log=print), cache.bundled_model("supra", log=print)}) == 3
    monkeypatch.setattr(cache, "__version__", "99.0")
    assert cache.bundled_model("liger-gla", log=print, sinks=4) != first and len(made) == 4
    assert made[-1] == {"method": "liger-gla", "force": True, "sinks": 4}


def test_the_default_chat_model_is_converted_as_the_adapter_says(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(chat_model, "bundled_model", lambda log, **conversion: calls.append(conversion) or tmp_path / "m")
    monkeypatch.setattr(chat_model, "load", lambda model, adapter_path, dequantize, fuse_adapter: ("model", "tokenizer"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "conversion.json").write_text(json.dumps({"method": "supra", "sinks": 2}))
    assert chat_model.load_chat_model(adapter=adapter, log=print)[2] == "m + adapter"
    packaged = chat_model.bundled_adapter()
    chat_model.load_chat_model(log=print)
    assert calls[0] == {"method": "supra", "sinks": 2}
    assert calls[1] == json.loads((packaged / "conversion.json").read_text()) and calls[1]["method"] in packaged.name
