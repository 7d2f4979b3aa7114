"""Shared fixtures: the spaCy pipeline is loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def extractor():
    """A PhraseExtractor with the default spaCy model, shared by the text tests."""
    from grit_pipeline.stages.text import PhraseExtractor

    ex = PhraseExtractor()
    ex.nlp  # noqa: B018 - load once, up front
    return ex
