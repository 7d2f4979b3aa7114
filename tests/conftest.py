"""Shared fixtures (the spaCy pipeline is loaded once per test session) and the gpu tier's skip."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def extractor():
    """A PhraseExtractor with the default spaCy model, shared by the text tests."""
    from grit_pipeline.stages.text import PhraseExtractor

    ex = PhraseExtractor()
    ex.nlp  # noqa: B018 - load once, up front
    return ex


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: torch is imported only when gpu tests are selected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)
