"""Training: the loss falls, resume continues exactly, checkpoints, --init fine-tuning, the CLI and presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from grit_pipeline.fixtures.scene_shards import write_scene_shards
from grit_pipeline.fixtures.synthetic import generate_scenes
from grit_pipeline.model.checkpoints import latest_checkpoint
from grit_pipeline.model.config import TrainConfig
from grit_pipeline.model.data import DataConfig
from grit_pipeline.model.presets import PRESETS, count_parameters, get_preset
from grit_pipeline.model.train import lr_factor, train

torch.set_num_threads(1)  # one thread: fast alone, and robust when the cores are shared


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(64, seed=11, size=(96, 96))


@pytest.fixture(scope="module")
def shard_dir(scenes, tmp_path_factory):
    return write_scene_shards(scenes, tmp_path_factory.mktemp("build"), per_shard=16)


def _config(shard_dir, out, **overrides):
    data = DataConfig(shards=str(shard_dir), batch_size=8, num_workers=0, shuffle_buffer=16, grounded_prob=0.5)
    fields = {"out": str(out), "data": data, "steps": 6, "lr": 2e-3, "warmup_steps": 2, "vocab_size": 300,
              "checkpoint_every": 3, "progress": False, "seed": 1}
    return TrainConfig(**{**fields, **overrides})


def test_dropout_override_reaches_the_model(shard_dir, tmp_path):
    from grit_pipeline.model.distributed import setup_distributed
    from grit_pipeline.model.train import prepare_model, prepare_processor

    config = _config(shard_dir, tmp_path / "run", dropout=0.1)
    model = prepare_model(config, prepare_processor(config, setup_distributed("cpu")))
    assert model.config.text_config.dropout == 0.1 and model.config.text_config.attention_dropout == 0.1
    with pytest.raises(ValueError, match="dropout"):
        _config(shard_dir, tmp_path / "bad", dropout=1.5)


def test_scored_token_loss_equals_the_models_own_loss_and_gradients():
    from grit_pipeline.model.presets import build_model
    from grit_pipeline.model.train import ScoredTokenLoss

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), 1200, first_location_id=100)
    ids = torch.randint(3, 1200, (3, 80))
    labels = ids.clone()
    labels[:, :67] = -100  # <s> <image> 64 placeholders </image>
    labels[1, 70:] = -100  # padding
    attention = (labels != -100).long()
    attention[:, :67] = 1
    position = torch.zeros_like(ids)
    position[:, 2:66] = 1
    batch = {"pixel_values": torch.randn(3, 3, 64, 64), "input_ids": ids, "attention_mask": attention,
             "image_embeds_position_mask": position, "labels": labels}
    expected = model(**batch).loss
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = ScoredTokenLoss(model)(**batch)
    ours.backward()
    assert torch.allclose(ours, expected, atol=1e-6)
    for name, parameter in model.named_parameters():
        if name in expected_grads:
            assert torch.allclose(parameter.grad, expected_grads[name], atol=1e-6), name


def test_loss_falls(shard_dir, tmp_path):
    result = train(_config(shard_dir, tmp_path / "run", steps=14, checkpoint_every=100))
    assert len(result.losses) == 14
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3


def test_resume_continues_exactly(shard_dir, tmp_path):
    # dropout 0.1 (the released model's): its random masks must continue exactly too
    straight = train(_config(shard_dir, tmp_path / "straight", steps=4, checkpoint_every=2, dropout=0.1))
    config = _config(shard_dir, tmp_path / "resumed", steps=4, checkpoint_every=2, dropout=0.1)
    first = train(config, stop_after=2)
    assert first.step == 2
    second = train(config, resume=True)
    assert second.step == 4
    assert first.losses + second.losses == straight.losses  # bit-identical


def test_checkpoint_contents(shard_dir, tmp_path):
    run = tmp_path / "run"
    train(_config(shard_dir, run, steps=3, checkpoint_every=2, keep_checkpoints=1))
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == "step_00000003"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]  # older one pruned
    for name in ("model.safetensors", "config.json", "optimizer.pt", "state.json", "tokenizer.json"):
        assert (checkpoint / name).exists(), name
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3
    assert state["data_positions"][0]["cursors"] == {"0": 24}  # 3 batches of 8 raw samples
    assert state["train_config"]["data"]["batch_size"] == 8
    assert json.loads((run / "config.json").read_text())["preset"] == "tiny"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and {"loss", "samples_per_s", "tokens_per_s", "lr"} <= set(metrics[-1])


def test_init_fine_tunes_a_pretrained_checkpoint_with_its_processor(shard_dir, tmp_path, scenes):
    from grit_pipeline.model.presets import build_model
    from grit_pipeline.model.tokenizer import build_processor, build_tokenizer

    tokenizer = build_tokenizer([s.caption for s in scenes], vocab_size=350, min_frequency=1)
    pretrained = tmp_path / "pretrained"
    build_model(get_preset("tiny"), len(tokenizer)).save_pretrained(pretrained)
    build_processor(tokenizer, 64).save_pretrained(pretrained)
    result = train(_config(shard_dir, tmp_path / "run", init=str(pretrained), steps=2, checkpoint_every=2))
    assert result.step == 2
    assert not (tmp_path / "run" / "processor").exists()  # the checkpoint's own processor, no new tokenizer
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) == len(json.loads((pretrained / "tokenizer.json").read_text())["model"]["vocab"])


def test_cli_train_then_generate(shard_dir, tmp_path, scenes):
    from grit_pipeline.cli import main

    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["train", "--shards", str(shard_dir), "--preset", "tiny", "--steps", "2",
                                  "--out", str(run), "--batch-size", "4", "--workers", "0", "--warmup-steps", "1",
                                  "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["checkpoint"].endswith("step_00000002")
    result = runner.invoke(main, ["train", "--shards", str(shard_dir), "--out", str(run), "--resume", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 3
    assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 4  # the saved config
    image = tmp_path / "scene.jpg"
    scenes[0].image.save(image)
    png = tmp_path / "boxes.png"
    result = runner.invoke(main, ["generate", "--checkpoint", str(run), "--image", str(image), "--prompt",
                                  "<grounding><phrase> a red circle</phrase>", "--max-new-tokens", "6",
                                  "--png", str(png)])
    assert result.exit_code == 0, result.output
    generation = json.loads(result.stdout.strip().splitlines()[-1])
    assert generation["text"].startswith("<grounding><phrase> a red circle</phrase>")
    assert set(generation) == {"text", "caption", "entities"} and png.exists()


def test_generation_parses_boxes_with_the_processor(shard_dir, tmp_path, scenes):
    """A model forced to emit an object parses into the entity and box transformers decodes."""
    from grit_pipeline.model.generate import Generator

    run = tmp_path / "run"
    train(_config(shard_dir, run, steps=1, checkpoint_every=1))
    generator = Generator(str(latest_checkpoint(run)), device="cpu")
    tokenizer = generator.processor.tokenizer
    forced = tokenizer.convert_tokens_to_ids(["<object>", "<patch_index_0033>", "<patch_index_0990>", "</object>"])
    sequence = iter(forced)

    def force(input_ids, scores):  # the untrained model's scores replaced by one certain token per step
        out = torch.full_like(scores, -1e9)
        out[:, next(sequence, tokenizer.eos_token_id)] = 0
        return out

    from transformers import LogitsProcessorList

    original = generator.model.generate
    generator.model.generate = lambda **kw: original(**kw, logits_processor=LogitsProcessorList([force]))
    result = generator.generate(scenes[0].image, "<grounding><phrase> a red circle</phrase>", max_new_tokens=5)
    assert [e.phrase for e in result.entities] == ["a red circle"]
    box = result.entities[0].boxes[0]
    # patch 33 = row 1, col 1; patch 990 = row 30, col 30; boxes decode to cell centres
    assert box.as_tuple() == pytest.approx((1.5 / 32, 1.5 / 32, 30.5 / 32, 30.5 / 32))


def test_lr_schedule_warms_up_then_decays_linearly():
    factors = [lr_factor(s, 4, 12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))


def test_kosmos2_preset_is_the_released_architecture():
    preset = PRESETS["kosmos-2"]
    config = preset.to_config(65037)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 14)
    assert (config.text_config.layers, config.text_config.embed_dim, config.text_config.ffn_dim) == (24, 2048, 8192)
    assert config.latent_query_num == 64
    parameters = count_parameters(preset, 65037)
    assert 1.5e9 < parameters < 1.8e9


def test_preset_validation():
    with pytest.raises(ValueError):
        get_preset("huge")
    with pytest.raises(ValueError, match="latent_query_num"):
        PRESETS["tiny"].__class__(**{**PRESETS["tiny"].to_dict(), "latent_query_num": 32})


def test_structured_init_makes_neighbouring_cells_alike():
    from grit_pipeline.model.presets import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), 1200, first_location_id=100)
    cells = torch.nn.functional.normalize(model.get_input_embeddings().weight[100:1124], dim=1)
    similarity = cells @ cells.T
    near = similarity[33, 34]  # (1, 1) vs (1, 2)
    far = similarity[33, 33 + 20 * 32 + 20]  # (1, 1) vs (21, 21)
    assert near > 0.9 and far < near - 0.3
    # the resampler hands the decoder 64 different image embeddings on the text embeddings' scale
    with torch.no_grad():
        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        embeds = model.get_image_features(pixels).pooler_output  # (2, 64, hidden)
    text_scale = model.get_input_embeddings().weight.abs().mean()
    assert embeds.std(dim=1).mean() > 0.3 * text_scale and embeds.abs().mean() > 0.3 * text_scale
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)  # tied


def test_structured_init_image_tokens_point_at_their_patch():
    from grit_pipeline.model.presets import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), 1200, first_location_id=100)
    with torch.no_grad():
        embeds = model.get_image_features(torch.rand(2, 3, 64, 64) * 2 - 1).pooler_output  # (2, 64, hidden)
    # image token i (patch i of the 8x8 grid) scores highest on the location token at that patch's centre
    nearest = (embeds @ model.get_input_embeddings().weight[100:1124].T).argmax(-1)
    patch = torch.arange(64)
    centre_row, centre_col = (patch // 8) * 4 + 1.5, (patch % 8) * 4 + 1.5
    error = (nearest // 32 - centre_row).abs() + (nearest % 32 - centre_col).abs()
    # patch centres are 4 cells apart; a random resampler's tokens point ~20 cells away
    assert error.float().mean() < 6


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(shard_dir, tmp_path):
    """DDP through torchrun (gloo on CPU): shards split by rank, one checkpoint with both ranks' positions."""
    import os
    import shutil
    import subprocess
    import sys

    grit = shutil.which("grit") or str(Path(sys.executable).with_name("grit"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "run"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", grit, "train", "--shards", str(shard_dir),
               "--out", str(run), "--steps", "3", "--batch-size", "4", "--workers", "0", "--warmup-steps", "1",
               "--vocab-size", "300", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["step"] == 3 and len(state["data_positions"]) == 2
