"""The one ordered list of stages a build runs; every runner runs this list, whatever it is given.

decode (bytes -> upright pixels) -> frames (supplied boxes into the stored pixels' frame) -> phrases (spaCy
noun chunks and referring expressions) -> clip (image-text similarity, only with a CLIP
model) -> ground (boxes per phrase) -> quality (box-quality filters, off by
default) -> assemble (the GRIT-20M record) ->
serialize (Kosmos-2 location tokens). The stage objects hold their config and load their models on first
use, so the list pickles to Ray workers before anything is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grit_pipeline.stages.assemble import AssembleStage
from grit_pipeline.stages.clip import ClipStage
from grit_pipeline.stages.frames import FrameStage
from grit_pipeline.stages.grounding import GroundStage
from grit_pipeline.stages.image import DecodeStage
from grit_pipeline.stages.quality import QualityStage
from grit_pipeline.stages.serialize import SerializeStage
from grit_pipeline.stages.text import PhraseStage

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.base import Stage


def build_stages(config: BuildConfig) -> list[Stage]:
    """The stages of a build, in order."""
    clip = [ClipStage(config)] if config.clip.enabled else []  # off: the list (and its pools) as before
    return [DecodeStage(config), FrameStage(config), PhraseStage(config), *clip, GroundStage(config),
            QualityStage(config), AssembleStage(config), SerializeStage(config)]
