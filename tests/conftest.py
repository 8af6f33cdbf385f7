"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch

# Test modules whose many tiny ops run faster (and far steadier on shared cores) on one intra-op thread.
ONE_THREAD = {"test_benchmark_scripts", "test_gpt", "test_gpt_t2i", "test_quantizers", "test_released", "test_resilience",
              "test_sampling", "test_soft_branch", "test_tokenizer"}


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in ONE_THREAD:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def t2i_runs(tmp_path_factory):
    """A tiny text-to-image run (and its tokenizer) shared by the text-to-image and page tests."""
    from helpers import tiny_t2i_runs

    return tiny_t2i_runs(tmp_path_factory.mktemp("t2i"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
