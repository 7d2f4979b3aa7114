"""The GroundingDINO grounder on a tiny random-weight model built here, loaded like a real checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from grit_pipeline.cli import main
from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
from grit_pipeline.records import DropReason, GritRecord, Span
from grit_pipeline.stages.detector_loading import (
    DetectorUnavailableError,
    GroundingConfig,
    ensure_detector_available,
    load_detector,
)
from grit_pipeline.stages.grounding import GroundingRequest
from grit_pipeline.stages.groundingdino import GroundingDinoGrounder, is_standard_processor
from grit_pipeline.stages.text import Phrase

NUM_QUERIES = 30


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory) -> str:
    """A tiny GroundingDINO saved with save_pretrained (model, tokenizer, image processor)."""
    return str(build_tiny_grounding_dino(tmp_path_factory.mktemp("tiny-gdino"), num_queries=NUM_QUERIES))


@pytest.fixture(scope="module")
def keep_all(tiny_detector) -> GroundingDinoGrounder:
    """Threshold 0 and no NMS: every predicted box survives, which exposes the assignment."""
    return GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0, nms_iou=None,
                                                 passes_per_forward=4))


def _phrases(caption: str, *chunks: str) -> list[Phrase]:
    phrases, start = [], 0
    for chunk in chunks:
        begin = caption.index(chunk, start)
        start = begin + len(chunk)
        phrases.append(Phrase(Span(begin, start), Span(begin, start), chunk.split()[-1]))
    return phrases


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _request(caption: str, phrases: list[Phrase], image: Image.Image | None, key: str = "k") -> GroundingRequest:
    return GroundingRequest(key=key, caption=caption, phrases=phrases, image=image)


def test_loads_through_the_real_checkpoint_path(tiny_detector):
    model, tokenizer, image_processor = load_detector(GroundingConfig(detector=tiny_detector))
    assert type(model).__name__ == "GroundingDinoForObjectDetection"
    assert tokenizer.convert_tokens_to_ids(".") == 1012 and tokenizer.cls_token_id == 101
    assert type(image_processor).__name__ == "GroundingDinoImageProcessorPil"


def test_every_predicted_box_goes_to_exactly_one_phrase(keep_all):
    caption = "a dog in a field of flowers"
    (result,) = keep_all.ground([_request(caption, _phrases(caption, "a dog", "a field", "flowers"), _image(80, 60, 0))])
    kept = sum(len(boxes) for boxes in result.boxes)
    assert kept + result.dropped[DropReason.DEGENERATE_BOX] == NUM_QUERIES  # one text pass
    for boxes in result.boxes:
        assert all(b.box.is_valid() and 0.0 <= b.score <= 1.0 for b in boxes)


def test_repeated_chunk_texts_share_their_boxes(keep_all):
    caption = "a dog and a cat and a dog"
    (result,) = keep_all.ground([_request(caption, _phrases(caption, "a dog", "a cat", "a dog"), _image(64, 64, 1))])
    assert result.boxes[0] == result.boxes[2]
    kept = len(result.boxes[0]) + len(result.boxes[1])
    assert kept + result.dropped[DropReason.DEGENERATE_BOX] == NUM_QUERIES  # "a dog" is prompted once


def test_long_captions_are_split_into_passes_within_256_tokens(keep_all):
    words = "dog cat man woman tree car house table chair boat bird horse ball shirt hat cup".split()
    chunks = [f"the {a} {b}" for a in words for b in words[:6]][:90]  # 90 distinct chunks, about 360 tokens
    caption = " and ".join(chunks)
    phrases = _phrases(caption, *chunks)
    plans = keep_all.plan(_request(caption, phrases, None))
    assert len(plans.passes) >= 2
    assert all(len(p.input_ids) <= 256 for p in plans.passes)
    (result,) = keep_all.ground([_request(caption, phrases, _image(64, 48, 2))])
    kept = sum(len(b) for b in result.boxes)
    assert kept + result.dropped[DropReason.DEGENERATE_BOX] == NUM_QUERIES * len(plans.passes)  # every pass ran


def test_same_result_batched_or_alone_for_same_size_images(tiny_detector):
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.3, passes_per_forward=8))
    caption = "a man with a hat"
    phrases = _phrases(caption, "a man", "a hat")
    requests = [_request(caption, phrases, _image(72, 56, seed), key=str(seed)) for seed in range(3)]
    together = grounder.ground(requests)
    alone = [grounder.ground([r])[0] for r in requests]
    for a, b in zip(together, alone, strict=True):
        assert [len(x) for x in a.boxes] == [len(x) for x in b.boxes]
        for boxes_a, boxes_b in zip(a.boxes, b.boxes, strict=True):
            for x, y in zip(boxes_a, boxes_b, strict=True):
                assert x.score == pytest.approx(y.score, abs=1e-4)
                assert x.box.as_tuple() == pytest.approx(y.box.as_tuple(), abs=1e-4)


def test_mixed_sizes_share_a_padded_forward(tiny_detector):
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0, passes_per_forward=8))
    caption = "a cat on a bed"
    phrases = _phrases(caption, "a cat", "a bed")
    requests = [_request(caption, phrases, _image(w, h, w), key=str(w)) for w, h in ((40, 90), (120, 50), (64, 64))]
    inputs = grounder.prepare_inputs([r.image for r in requests], [[101, 5, 1012, 102]] * 3)
    assert inputs["pixel_mask"].shape[0] == 3 and not bool(inputs["pixel_mask"].all())  # padding is masked
    for result in grounder.ground(requests):
        assert result.drop_reason is None
        assert all(b.box.is_valid() for boxes in result.boxes for b in boxes)


def test_default_filter_keeps_scores_above_threshold_without_overlaps(tiny_detector):
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector))
    caption = "two children and a puppy on a red sofa"
    (result,) = grounder.ground([_request(caption, _phrases(caption, "two children", "a puppy", "a red sofa"),
                                          _image(96, 64, 5))])
    kept = [b for boxes in result.boxes for b in boxes]
    assert all(b.score > 0.65 for b in kept)
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            assert a.box.iou(b.box) <= 0.6 + 1e-9


def test_requests_without_image_or_phrases_are_dropped_with_reason(keep_all):
    caption = "a dog"
    no_image, no_phrases = keep_all.ground([_request(caption, _phrases(caption, "a dog"), None),
                                            _request(caption, [], _image(32, 32, 0))])
    assert no_image.drop_reason is DropReason.IMAGE_MISSING and no_image.boxes == [[]]
    assert no_phrases.drop_reason is DropReason.NO_NOUN_CHUNKS


def test_describe_records_provenance(keep_all, tiny_detector):
    info = keep_all.describe()
    assert info["grounder"] == "grounding-dino" and info["detector"] == tiny_detector
    assert len(info["weights_sha256"]) == 64 and info["device"] == "cpu"


def test_missing_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DetectorUnavailableError) as info:
        GroundingDinoGrounder(GroundingConfig(detector="IDEA-Research/grounding-dino-tiny"))
    message = str(info.value)
    assert "IDEA-Research/grounding-dino-tiny" in message and "save_pretrained" in message
    with pytest.raises(DetectorUnavailableError, match="does not exist"):
        GroundingDinoGrounder(GroundingConfig(detector=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorUnavailableError, match="not a GroundingDINO checkpoint"):
        GroundingDinoGrounder(GroundingConfig(detector=str(tmp_path / "empty")))


def test_ensure_detector_available_fails_fast(monkeypatch, tmp_path, tiny_detector):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ensure_detector_available(GroundingConfig(detector=tiny_detector))
    with pytest.raises(DetectorUnavailableError, match="IDEA-Research/grounding-dino-base"):
        ensure_detector_available(GroundingConfig(detector="IDEA-Research/grounding-dino-base"))
    with pytest.raises(DetectorUnavailableError, match="no config.json"):
        ensure_detector_available(GroundingConfig(detector=str(tmp_path)))


# --- the command line -------------------------------------------------------------------------------------


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _write_inputs(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir()
    (images / "plain.jpg").write_bytes(_jpeg(_image(80, 60, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6
    (images / "rotated.jpg").write_bytes(_jpeg(_image(90, 40, 1), exif=exif.tobytes()))
    (images / "broken.jpg").write_bytes(_jpeg(_image(90, 40, 2))[:300])
    lines = [
        json.dumps({"key": "a0", "image": "plain.jpg", "caption": "a dog in a field of flowers", "url": "http://x/a"}),
        json.dumps({"key": "a1", "image": "rotated.jpg", "caption": "a man with a red hat"}),
        json.dumps({"key": "a2", "image": "broken.jpg", "caption": "a cat"}),
        json.dumps({"key": "a3", "image": "missing.jpg", "caption": "a cat"}),
        "{not json",
        json.dumps({"key": "a5", "image": "plain.jpg"}),
        json.dumps({"key": "a6", "image": "../plain.jpg", "caption": "a cat"}),
    ]
    captions = root / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    return images, captions


def test_grit_ground_prints_grit20m_rows_and_reports_bad_lines(tiny_detector, tmp_path):
    images, captions = _write_inputs(tmp_path)
    result = CliRunner().invoke(main, ["ground", str(images), str(captions), "--detector", tiny_detector,
                                       "--box-threshold", "0.0"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source_key"] for r in rows] == ["a0", "a1"]  # the records `grit build` writes, keyed alike
    records = [GritRecord.from_row(r) for r in rows]
    assert records[0].url == "http://x/a" and (records[0].width, records[0].height) == (80, 60)
    assert (records[1].width, records[1].height) == (40, 90)  # EXIF-rotated: boxes refer to upright pixels
    for record in records:
        assert record.noun_chunks and len(record.ref_exps) == len(record.noun_chunks)
        assert all(e.box.is_valid() for e in record.noun_chunks)
    for key, reason in (("a2", "image_truncated"), ("a3", "image_missing"), ("'4'", "malformed_record"),
                        ("a5", "no caption"), ("a6", "unsafe")):
        assert any(key in line and reason in line for line in result.stderr.splitlines()), (key, result.stderr)
    summary = json.loads(result.stderr.strip().splitlines()[-1].split("summary: ", 1)[1])
    assert summary["grounded"] == 2 and summary["malformed_record"] == 2 and summary["image_missing"] == 2


def test_grit_ground_exits_2_without_output_when_the_model_is_missing(tmp_path):
    images, captions = _write_inputs(tmp_path)
    result = CliRunner().invoke(main, ["ground", str(images), str(captions), "--offline",
                                       "--detector", "IDEA-Research/grounding-dino-tiny"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "IDEA-Research/grounding-dino-tiny" in result.stderr


def test_grit_ground_with_annotations(tmp_path):
    images, _ = _write_inputs(tmp_path)
    grit_row = {"key": "g0", "image": "plain.jpg", "caption": "a dog in a field",
                "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9], [9, 16, 0.0, 0.5, 1.0, 1.0, 0.5]],
                "ref_exps": [[0, 16, 0.1, 0.1, 0.5, 0.5, 0.9], [9, 16, 0.0, 0.5, 1.0, 1.0, 0.5]],
                "clip_similarity_vitb32": 0.3}
    coco = {"key": "c0", "image": "plain.jpg", "caption": "a woman with her puppy",
            "annotations": [{"category": "person", "bbox": [8, 6, 40, 48]}, {"category": "dog", "box": "bad"}]}
    captions = tmp_path / "annotated.jsonl"
    captions.write_text(json.dumps(grit_row) + "\n" + json.dumps(coco) + "\n")
    result = CliRunner().invoke(main, ["ground", str(images), str(captions), "--grounder", "annotations"])
    assert result.exit_code == 0, result.stderr
    g0, c0 = (GritRecord.from_row(json.loads(line)) for line in result.stdout.splitlines())
    assert [(e.span, e.score) for e in g0.ref_exps] == [(Span(0, 16), 0.9)]  # 0.5 is under the threshold
    assert g0.clip_similarity_vitb32 == 0.3
    assert [e.span.text(c0.caption) for e in c0.noun_chunks] == ["a woman"]
    assert c0.noun_chunks[0].box.as_tuple() == pytest.approx((0.1, 0.1, 0.6, 0.9))
    summary = json.loads(result.stderr.strip().splitlines()[-1].split("summary: ", 1)[1])
    assert summary["span:malformed_record"] == 1  # the annotation with a bad box, counted inside its sample


def test_bench_detector_reports_both_rates(tiny_detector):
    from grit_pipeline.benchmarks.detector import run_detector_bench

    report = run_detector_bench(detector=tiny_detector, n_images=4, passes_per_forward=2, device="cpu", repeats=1)
    assert report["items_per_s"] > 0 and report["baseline_items_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["items_per_s"] / report["baseline_items_per_s"], rel=0.02)
    assert report["text_passes"] == 4


@pytest.mark.parametrize("default_processor", [False, True])  # True: grounding-dino-tiny's 800/1333 processor
def test_fast_preprocessing_equals_the_checkpoint_processor(tiny_detector, default_processor):
    import torch
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, preprocess_threads=3))
    if default_processor:
        grounder.image_processor = GroundingDinoImageProcessorPil()
    assert grounder.fast_preprocessing
    images = [_image(40 + 53 * i, 300 - 31 * i, i) for i in range(7)]
    expected = grounder.image_processor(images=images, return_tensors="pt")
    got = grounder.preprocess_images(images)
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(got["pixel_mask"], expected["pixel_mask"])


def test_other_processor_settings_go_through_the_processor(tiny_detector):
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    processor = GroundingDinoImageProcessorPil(size={"height": 96, "width": 96})
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0))
    grounder.image_processor = processor
    grounder.fast_preprocessing = is_standard_processor(processor)
    assert not grounder.fast_preprocessing
    caption = "a dog"
    (result,) = grounder.ground([_request(caption, _phrases(caption, "a dog"), _image(50, 70, 3))])
    assert result.drop_reason is None


class _FailingModel:
    """Wraps the real model; raises for forwards that `fails(pixel_values)` says should fail."""

    def __init__(self, model, fails):
        self.model, self.fails = model, fails

    def __call__(self, **inputs):
        if self.fails(inputs["pixel_values"]):
            raise RuntimeError("simulated failure")
        return self.model(**inputs)


def test_a_failed_batch_is_retried_pass_by_pass(tiny_detector, monkeypatch):
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0, passes_per_forward=4))
    caption = "a dog on a bed"
    requests = [_request(caption, _phrases(caption, "a dog", "a bed"), _image(64, 64, s), key=str(s)) for s in range(3)]
    expected = grounder.ground(requests)
    monkeypatch.setattr(grounder, "model", _FailingModel(grounder.model, lambda pixels: pixels.shape[0] > 1))
    got = grounder.ground(requests)  # like an out-of-memory error at batch 3 that batch 1 avoids
    assert [r.drop_reason for r in got] == [None] * 3
    assert [[len(b) for b in r.boxes] for r in got] == [[len(b) for b in r.boxes] for r in expected]


def test_a_request_whose_own_pass_fails_is_dropped_with_stage_error(tiny_detector, monkeypatch):
    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0, passes_per_forward=4))
    caption = "a dog on a bed"
    phrases = _phrases(caption, "a dog", "a bed")
    poison = Image.new("RGB", (64, 64), (0, 0, 0))  # flat pixels mark the request to fail

    def flat(pixels):
        return any(bool((row == row.flatten()[0]).all()) for row in pixels[:, 0])

    requests = [_request(caption, phrases, _image(64, 64, 0), "a"), _request(caption, phrases, poison, "b"),
                _request(caption, phrases, _image(64, 64, 1), "c")]
    monkeypatch.setattr(grounder, "model", _FailingModel(grounder.model, flat))
    good, bad, other = grounder.ground(requests)
    assert good.drop_reason is None and other.drop_reason is None
    assert bad.drop_reason is DropReason.STAGE_ERROR and "RuntimeError: simulated failure" in bad.error
    monkeypatch.setattr(grounder.model, "fails", lambda pixels: True)  # fails whatever the data: not isolated
    with pytest.raises(RuntimeError, match="simulated failure"):
        grounder.ground(requests)


@pytest.mark.parametrize("nms_iou", [0.6, None])
def test_stage_equals_the_reference_logic_on_its_own_forward(tiny_detector, nms_iou):
    """The device-side selection inside `ground` gives what assign_boxes + result_from_candidates give."""
    from collections import Counter

    from grit_pipeline.stages.grounding import assign_boxes, result_from_candidates
    from grit_pipeline.work import batched

    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.3, nms_iou=nms_iou,
                                                     passes_per_forward=3, max_text_tokens=12))
    captions = ["a dog and a cat and a dog", "two children and a puppy on a red sofa near the window", "a man"]
    requests = []
    for seed, caption in enumerate(captions):
        chunks = [c for c in ("a dog", "a cat", "a dog", "two children", "a puppy", "a red sofa", "the window",
                              "a man") if c in caption]
        requests.append(_request(caption, _phrases(caption, *dict.fromkeys(chunks)) if seed else
                                 _phrases(caption, "a dog", "a cat", "a dog"), _image(64 + 8 * seed, 64, seed), str(seed)))
    got = grounder.ground(requests)
    plans = [grounder.plan(r) for r in requests]
    assert max(len(plan.passes) for plan in plans) > 1  # 12 tokens: the long caption takes several passes
    items = [(index, text_pass) for index, plan in enumerate(plans) for text_pass in plan.passes]
    candidates: list[list] = [[] for _ in requests]
    for chunk in batched(items, 3):  # the stage's own forwards: same passes, same padding
        probs, corners = grounder.forward([requests[i].image for i, _ in chunk], [p.input_ids for _, p in chunk])
        for row, (index, text_pass) in enumerate(chunk):
            candidates[index] += assign_boxes(probs[row, :, : len(text_pass.input_ids)], corners[row],
                                              text_pass.phrase_tokens, text_pass.phrase_ids, min_score=0.3)
    for request, plan, found, result in zip(requests, plans, candidates, got, strict=True):
        expected = result_from_candidates(found, plan.phrase_targets, len(request.phrases),
                                          grounder.config.box_filter(), Counter())
        assert [len(b) for b in result.boxes] == [len(b) for b in expected.boxes]
        for boxes, expected_boxes in zip(result.boxes, expected.boxes, strict=True):
            for box, expected_box in zip(boxes, expected_boxes, strict=True):
                assert box.score == pytest.approx(expected_box.score, abs=1e-5)
                assert box.box.as_tuple() == pytest.approx(expected_box.box.as_tuple(), abs=1e-5)


@pytest.mark.gpu
def test_cuda_stage_matches_the_cpu_stage(tiny_detector):
    """On CUDA (pinned buffers, a collect stream, NMS rounds) the results match the CPU's, up to float noise."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    caption = "two children and a puppy on a red sofa"
    phrases = _phrases(caption, "two children", "a puppy", "a red sofa")
    requests = [_request(caption, phrases, _image(60 + 9 * s, 90 - 7 * s, s), str(s)) for s in range(7)]
    results = {}
    for device in ("cpu", "cuda"):
        grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, box_threshold=0.0, nms_iou=None,
                                                         passes_per_forward=3, device=device, dtype="float32"))
        results[device] = grounder.ground(requests)
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"], strict=True):
        scores_cpu = sorted(b.score for boxes in on_cpu.boxes for b in boxes)
        scores_cuda = sorted(b.score for boxes in on_cuda.boxes for b in boxes)
        assert len(scores_cpu) == len(scores_cuda)
        assert np.allclose(scores_cpu, scores_cuda, atol=1e-3)


def test_forward_i_runs_while_i_plus_1_is_prepared_and_i_minus_1_collected(tiny_detector, monkeypatch):
    """The helpers overlap the model: forward i, preparing i+1 and collecting i-1 each wait for the others to
    have started, which only concurrent work satisfies; run in sequence, the waits would time out."""
    import threading

    grounder = GroundingDinoGrounder(GroundingConfig(detector=tiny_detector, passes_per_forward=1, box_threshold=0.0))
    count = 4
    started = {kind: [threading.Event() for _ in range(count)] for kind in ("prepare", "forward", "collect")}
    calls = {"prepare": 0, "forward": 0}
    real_prepare, real_collect, real_model = grounder.prepare_inputs, grounder._collect, grounder.model
    overlapped: list[tuple[str, int, bool]] = []

    def prepare(*args, **kwargs):
        number = calls["prepare"]
        calls["prepare"] += 1
        started["prepare"][number].set()
        if number >= 1:
            overlapped.append(("prepare during forward", number, started["forward"][number - 1].wait(20)))
        return real_prepare(*args, **kwargs)

    def collect(chunk, raw, state, batch):
        number = chunk[0][0]  # one pass per request and per forward: the request index is the forward's
        started["collect"][number].set()
        if number + 1 < count:
            overlapped.append(("collect during forward", number, started["forward"][number + 1].wait(20)))
        real_collect(chunk, raw, state, batch)

    def model(**inputs):
        number = calls["forward"]
        calls["forward"] += 1
        started["forward"][number].set()
        if number + 1 < count:
            overlapped.append(("forward during prepare", number, started["prepare"][number + 1].wait(20)))
        if number >= 1:
            overlapped.append(("forward during collect", number, started["collect"][number - 1].wait(20)))
        return real_model(**inputs)

    monkeypatch.setattr(grounder, "prepare_inputs", prepare)
    monkeypatch.setattr(grounder, "_collect", collect)
    monkeypatch.setattr(grounder, "model", model)
    caption = "a dog on a bed"
    requests = [_request(caption, _phrases(caption, "a dog", "a bed"), _image(64, 64, s), str(s)) for s in range(count)]
    results = grounder.ground(requests)
    assert [r.drop_reason for r in results] == [None] * count
    assert len(overlapped) == 4 * (count - 1) and all(ok for *_, ok in overlapped), overlapped
