"""Fixtures shared by every test folder; the builders behind them are in helpers.py."""

from __future__ import annotations

import pytest

from helpers import (
    CORE_ARCHS,
    make_model,
    make_tokenizer,
)


@pytest.fixture(params=CORE_ARCHS)
def core_model(request):
    return make_model(request.param)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and the tiny tokenizer saved as a model folder (loaded as users load models)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
