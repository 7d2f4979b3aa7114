"""`grit eval` generation: Kosmos-2's prompts, patch-index box decoding, and batched generation on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from grit_pipeline.eval.annotations import parse_annotations
from grit_pipeline.eval.generation import (
    GroundingQuery,
    decode_boxes,
    decode_entities,
    flickr_queries,
    generate_predictions,
    load_grounding_model,
    missing_images,
    patch_index_box,
    refexp_queries,
)

torch.set_num_threads(1)

CAPTION = "A man with a red hat walks his dog"


def _flickr_sentences(file_name, width, height, caption, original_img_id, sentence_id, phrase_spans):
    """Sentences parsed from an MDETR-layout Flickr dict (one ground-truth box per phrase), as `grit eval` reads them."""
    image = {"file_name": file_name, "height": height, "width": width, "id": 7, "caption": caption,
             "dataset_name": "flickr", "tokens_negative": [[0, len(caption)]], "sentence_id": sentence_id,
             "original_img_id": original_img_id, "tokens_positive_eval": phrase_spans}
    annotations = [{"area": 1, "iscrowd": 0, "image_id": 7, "category_id": 1, "id": n, "bbox": [0, 0, 1, 1],
                    "tokens_positive": spans} for n, spans in enumerate(phrase_spans)]
    data = {"info": [], "licenses": [], "images": [image], "annotations": annotations,
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}
    return parse_annotations(data).sentences


def _expressions(id_, file_name, width, height, caption):
    """One RefCOCOg-layout expression parsed as `grit eval` reads it."""
    data = {"images": [{"file_name": file_name, "height": height, "width": width, "id": id_, "original_id": 1,
                        "caption": caption, "dataset_name": "refcocog", "tokens_negative": [[0, len(caption)]]}],
            "annotations": [{"area": 1, "iscrowd": 0, "image_id": id_, "category_id": 1, "id": 1,
                             "bbox": [0, 0, 1, 1], "original_id": 1, "tokens_positive": [[0, len(caption)]]}],
            "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}
    return parse_annotations(data).expressions


def _flat(boxes):
    return [v for box in boxes for v in box]


def _approx(boxes):
    return pytest.approx(_flat(boxes))


def test_flickr_prompts_keep_the_two_spaces_and_a_phrase_at_the_start():
    sentences = _flickr_sentences("1000092795.jpg", "500", "375", CAPTION, 1000092795, 2,
                                  [[[0, 5]], [[11, 20]], [[31, 34], [11, 20]]])
    queries = flickr_queries(sentences, "img")
    assert queries[0].image_path == "img/1000092795.jpg"
    assert [q.id for q in queries] == ["1000092795_2_0", "1000092795_2_1", "1000092795_2_2"]
    assert [q.prompt for q in queries] == [
        "<grounding> <phrase>A man</phrase>",  # at the start: one space, from " <phrase>"
        "<grounding>A man with  <phrase>a red hat</phrase>",  # the prefix's space + " <phrase>": two
        "<grounding>A man with a red hat walks his  <phrase>dog</phrase>",  # first span of several
    ]
    assert [q.phrase for q in queries] == ["A man", "a red hat", "dog"]
    assert (queries[0].width, queries[0].height) == (500.0, 375.0)  # MDETR's Flickr sizes are strings


def test_refexp_prompts():
    queries = refexp_queries(_expressions(1234, "COCO_train2014_000000000009.jpg", 640, 480, "the left man in blue"),
                             "coco")
    assert queries == [GroundingQuery(id="1234", image_path="coco/COCO_train2014_000000000009.jpg", width=640.0,
                                      height=480.0, prompt="<grounding><phrase>the left man in blue</phrase>",
                                      phrase="the left man in blue")]


def test_patch_index_boxes_centres_and_edges():
    c = 1 / 32
    # different rows and columns: cell centres; 33 = (x 1, y 1), 990 = (x 30, y 30)
    assert patch_index_box(33, 990) == pytest.approx((1.5 * c, 1.5 * c, 30.5 * c, 30.5 * c))
    assert patch_index_box(0, 1023) == pytest.approx((0.5 * c, 0.5 * c, 31.5 * c, 31.5 * c))
    # one cell, one row, one column: cell edges
    assert patch_index_box(37, 37) == pytest.approx((5 * c, 1 * c, 6 * c, 2 * c))
    assert patch_index_box(64, 70) == pytest.approx((0, 2 * c, 7 * c, 3 * c))  # row 2, x 0..6
    assert patch_index_box(3, 99) == pytest.approx((3 * c, 0, 4 * c, 4 * c))  # column 3, y 0..3


def test_patch_index_box_matches_transformers():
    from transformers.models.kosmos2.processing_kosmos2 import patch_index_to_coordinate

    for ul, lr in ((33, 990), (37, 37), (64, 70), (3, 99), (500, 12), (1023, 0)):
        assert patch_index_box(ul, lr) == pytest.approx(patch_index_to_coordinate(ul, lr, 32))


def test_decode_boxes_from_generated_text():
    text = ("<grounding>A man with  <phrase>a red hat</phrase><object><patch_index_0033><patch_index_0990>"
            "</delimiter_of_multi_objects/><patch_index_0064><patch_index_0070></object> walks"
            "<phrase> his dog</phrase><object><patch_index_0000><patch_index_0001></object> and"
            "<phrase> a red hat</phrase><object><patch_index_0037><patch_index_0037></object>")
    w, h = 320.0, 640.0
    boxes = decode_boxes(text, "a red hat", w, h)
    assert len(boxes) == 3 and _flat(boxes) == _approx([
        [1.5 * 10, 1.5 * 20, 30.5 * 10, 30.5 * 20],  # centres, scaled by width/32 = 10, height/32 = 20
        [0, 2 * 20, 7 * 10, 3 * 20],  # one row: edges
        [5 * 10, 1 * 20, 6 * 10, 2 * 20],  # the same phrase generated again: counted, in generation order
    ])
    assert _flat(decode_boxes(text, " his dog ", w, h)) == _approx([[0, 0, 2 * 10, 1 * 20]])  # stripped match
    assert decode_boxes(text, "a man", w, h) == []
    # none: no object, an unterminated object, an object without a phrase
    assert decode_boxes("<grounding><phrase>a dog</phrase> is running", "a dog", w, h) == []
    assert decode_boxes("<grounding><phrase>a dog</phrase><object><patch_index_0033>", "a dog", w, h) == []
    assert decode_boxes("<grounding> a dog<object><patch_index_0033><patch_index_0990></object>", "a dog", w, h) == []
    assert decode_entities("x<object><patch_index_0033><patch_index_0990></object>")[0][0] is None
    # an inverted pair keeps its rank as a zero-area box at its first corner (IoU 0, as in unilm)
    inverted = decode_boxes("<phrase>a</phrase><object><patch_index_0990><patch_index_0033></object>", "a", w, h)
    assert _flat(inverted) == _approx([[30.5 * 10, 30.5 * 20, 30.5 * 10, 30.5 * 20]])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from grit_pipeline.model.presets import build_model, get_preset
    from grit_pipeline.model.tokenizer import build_processor, build_tokenizer

    torch.manual_seed(0)
    texts = [CAPTION, "two children play in the park", "the left man in blue", "a dog on a bench"] * 4
    tokenizer = build_tokenizer(texts, vocab_size=300, min_frequency=1)
    folder = tmp_path_factory.mktemp("kosmos2-tiny")
    build_model(get_preset("tiny"), len(tokenizer)).save_pretrained(folder)
    build_processor(tokenizer, 64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (size, colour) in enumerate((((120, 80), (200, 30, 30)), ((90, 150), (30, 200, 30)))):
        path = folder / f"{index}.jpg"
        Image.new("RGB", size, colour).save(path)
        paths.append(path)
    flickr = flickr_queries(_flickr_sentences(paths[0].name, "120", "80", CAPTION, 77, 0, [[[0, 5]], [[11, 20]]]),
                            folder)
    refexp = refexp_queries(_expressions(9, paths[1].name, 90, 150, "a dog on a bench"), folder)
    return flickr + refexp


def _check_format(predictions, queries):
    assert [p["id"] for p in predictions] == [q.id for q in queries]
    for prediction, query in zip(predictions, queries, strict=True):
        assert set(prediction) == {"id", "boxes", "text"}
        assert prediction["text"].startswith(query.prompt)
        json.dumps(prediction)
        for x1, y1, x2, y2 in prediction["boxes"]:
            assert 0 <= x1 <= x2 <= query.width and 0 <= y1 <= y2 <= query.height


def test_generate_predictions_end_to_end_on_a_tiny_model(tiny_checkpoint, queries):
    model, processor = load_grounding_model(str(tiny_checkpoint), device="cpu")
    predictions = generate_predictions(model, processor, queries, batch_size=2, device="cpu", progress=False,
                                       max_new_tokens=6)
    _check_format(predictions, queries)
    # batching changes nothing: prompts of one token length share a batch, unpadded
    single = generate_predictions(model, processor, queries, batch_size=1, device="cpu", progress=False,
                                  max_new_tokens=6)
    assert single == predictions

    # a model that emits one object then stops: the object after the query phrase decodes to pixel boxes
    tokenizer = processor.tokenizer
    forced = tokenizer.convert_tokens_to_ids(["<object>", "<patch_index_0033>", "<patch_index_0990>",
                                              "</delimiter_of_multi_objects/>", "<patch_index_0064>",
                                              "<patch_index_0070>", "</object>"])
    from transformers import LogitsProcessorList

    def force(input_ids, scores):
        step = input_ids.shape[1] - force.prompt_length
        out = torch.full_like(scores, -1e9)
        out[:, forced[step] if step < len(forced) else tokenizer.eos_token_id] = 0
        return out

    original = model.generate

    def forced_generate(**kwargs):
        force.prompt_length = kwargs["input_ids"].shape[1]
        return original(**kwargs, logits_processor=LogitsProcessorList([force]))

    model.generate = forced_generate
    try:
        predictions = generate_predictions(model, processor, queries, batch_size=3, device="cpu", progress=False,
                                           max_new_tokens=10)
    finally:
        del model.generate
    _check_format(predictions, queries)
    for prediction, query in zip(predictions, queries, strict=True):
        x, y = query.width / 32, query.height / 32
        assert len(prediction["boxes"]) == 2
        assert _flat(prediction["boxes"]) == _approx([[1.5 * x, 1.5 * y, 30.5 * x, 30.5 * y], [0, 2 * y, 7 * x, 3 * y]])
        assert prediction["text"] == (query.prompt + "<object><patch_index_0033><patch_index_0990>"
                                      "</delimiter_of_multi_objects/><patch_index_0064><patch_index_0070></object>")


def test_unreadable_image_is_a_reported_miss(tiny_checkpoint, queries, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    bad = GroundingQuery("5", str(broken), 10, 10, "<grounding><phrase>a dog</phrase>", "a dog")
    assert missing_images([bad, queries[0], GroundingQuery("6", str(tmp_path / "nope.jpg"), 1, 1, "", "")]) == [
        str(tmp_path / "nope.jpg")]
    model, processor = load_grounding_model(str(tiny_checkpoint), device="cpu")
    predictions = generate_predictions(model, processor, [bad, queries[2]], device="cpu", progress=False,
                                       max_new_tokens=2)
    assert [p["id"] for p in predictions] == ["5", queries[2].id]
    assert predictions[0]["boxes"] == [] and "cannot read image" in predictions[0]["error"]


def test_missing_or_unusable_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    from grit_pipeline.model.generate import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_grounding_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Kosmos-2 checkpoint"):
        load_grounding_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        load_grounding_model("no-such-owner/no-such-kosmos-2")


def test_grit_train_run_folder_loads_with_its_training_pixels(tiny_checkpoint, queries, tmp_path):
    import shutil

    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    shutil.copytree(tiny_checkpoint, step)
    (step / "state.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "run" / "latest").write_text("step_00000001")
    model, processor = load_grounding_model(str(tmp_path / "run"), device="cpu")
    assert model._grit_eval_resize == "grit"
    predictions = generate_predictions(model, processor, queries[:1], device="cpu", progress=False, max_new_tokens=3)
    _check_format(predictions, queries[:1])


def test_grit_eval_refcoco_and_flickr30k_generate_write_and_score(tiny_checkpoint, tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from grit_pipeline.cli import main
    from grit_pipeline.eval.annotations import load_annotations
    from grit_pipeline.eval.predictions import prediction_ids, read_predictions

    data = Path(__file__).parent / "data" / "mdetr"
    images = tmp_path / "images"
    images.mkdir()
    for name in ("finetune_refcocog_val.json", "final_flickr_separateGT_val.json"):
        for entry in json.loads((data / name).read_text())["images"]:
            Image.new("RGB", (int(entry["width"]), int(entry["height"])), (90, 120, 200)).save(images / entry["file_name"])
    for command, name, key in (("refcoco", "finetune_refcocog_val.json", "refcocog"),
                               ("flickr30k", "final_flickr_separateGT_val.json", "any_box")):
        predictions = tmp_path / f"{command}.jsonl"
        result = CliRunner().invoke(main, ["eval", command, "--annotations", str(data / name), "--images",
                                           str(images), "--checkpoint", str(tiny_checkpoint), "--predictions",
                                           str(predictions), "--device", "cpu", "--max-new-tokens", "8"])
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout[result.stdout.index("{"):])
        assert key in metrics and metrics["predictions_file"] == str(predictions)
        rescored = CliRunner().invoke(main, ["eval", "score", "--annotations", str(data / name), "--predictions",
                                             str(predictions)])
        assert json.loads(rescored.stdout)[key] == metrics[key]  # generation and scoring agree
        expected = prediction_ids(load_annotations(data / name))
        assert [p.id for p in read_predictions(predictions)] == expected  # one line per query, in order
    wrong = CliRunner().invoke(main, ["eval", "flickr30k", "--annotations", str(data / "finetune_refcocog_val.json"),
                                      "--images", str(images), "--checkpoint", str(tiny_checkpoint)])
    assert wrong.exit_code == 1 and "use `grit eval refcoco`" in wrong.output and "Traceback" not in wrong.output
