"""`make e2e`'s pieces at toy scale: training through train_tiny, the two prompt protocols, the baseline."""

from __future__ import annotations

import torch

from grit_pipeline.fixtures.scene_shards import write_scene_shards
from grit_pipeline.fixtures.synthetic import generate_scenes
from grit_pipeline.model.e2e import (
    E2EConfig,
    evaluate,
    held_out_scenes,
    mean_train_box,
    train_tiny,
    training_scenes,
)
from grit_pipeline.records import Box

torch.set_num_threads(1)


def test_e2e_evaluation_scores_every_held_out_phrase(tmp_path):
    config = E2EConfig(train_scenes=24, test_scenes=5, scene_size=64, steps=2, batch_size=4, warmup_steps=1)
    shards = write_scene_shards(generate_scenes(24, seed=0, size=(64, 64)), tmp_path / "build", per_shard=8)
    result = train_tiny(config, shards, tmp_path / "run")
    assert result.step == 2 and result.checkpoint
    scenes = held_out_scenes(config)
    figures = evaluate(result.checkpoint, scenes, mean_train_box(training_scenes(config)))
    assert figures["phrases"] == sum(len(scene.objects) for scene in scenes)
    assert sum(group["phrases"] for group in figures["by_shape_count"].values()) == figures["phrases"]
    for group in figures["by_shape_count"].values():
        # the best-fitting shape of the scene fits at least as well as the named one
        assert group["in_caption_any_shape"]["mean_iou"] >= group["in_caption"]["mean_iou"]
    for protocol in ("phrase_alone", "in_caption", "baseline"):
        assert 0.0 <= figures[protocol]["mean_iou"] <= 1.0
        # grit eval's scorer, on the scenes written as an MDETR Flickr file, agrees with the e2e's own count
        mdetr = figures["mdetr_flickr_any_box"][protocol]
        assert mdetr["phrases"] == figures["phrases"]
        assert mdetr["recall@1"] == figures[protocol]["acc_at_iou_0_5"]


def test_baseline_is_the_mean_training_box():
    config = E2EConfig(train_scenes=10, scene_size=64)
    boxes = [o.box.as_tuple() for s in generate_scenes(10, seed=0, size=(64, 64)) for o in s.objects]
    expected = Box(*(sum(column) / len(boxes) for column in zip(*boxes, strict=True)))
    assert mean_train_box(training_scenes(config)).as_tuple() == expected.as_tuple()
    # held-out scenes are other scenes than the training ones (another seed)
    held_out = [o[1].as_tuple() for s in held_out_scenes(E2EConfig(test_scenes=10, scene_size=64)) for o in s.objects]
    assert not set(held_out) & set(boxes)
