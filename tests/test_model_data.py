"""The trainer's webdataset loader: ordering, splitting, resume positions, text choice and bad samples."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from grit_pipeline.fixtures.scene_shards import write_scene_shards
from grit_pipeline.fixtures.synthetic import generate_scenes
from grit_pipeline.model.data import (
    BadSampleBudget,
    DataConfig,
    DataPosition,
    ShardStream,
    SkipRateExceeded,
    epoch_shards,
    list_shards,
    make_loader,
    split_by_node,
    split_by_worker,
)
from grit_pipeline.model.encoding import SampleEncoder, grounded_choice
from grit_pipeline.model.pixels import decode_pixels, load_pixels
from grit_pipeline.model.tokenizer import build_tokenizer
from grit_pipeline.records import DropReason

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(48, seed=3, size=(96, 96))


@pytest.fixture(scope="module")
def shard_dir(scenes, tmp_path_factory):
    return write_scene_shards(scenes, tmp_path_factory.mktemp("build"), per_shard=8)


@pytest.fixture(scope="module")
def tokenizer(scenes):
    return build_tokenizer([s.caption for s in scenes], vocab_size=300, min_frequency=1)


def _stream(shard_dir, tokenizer, start=None, rank=0, world_size=1, **overrides):
    fields = {"shards": str(shard_dir), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 6, "seed": 5}
    config = DataConfig(**{**fields, **overrides})
    urls, sizes = list_shards(shard_dir)
    return ShardStream(urls, sizes, SampleEncoder(tokenizer, 32, config), config, rank, world_size, start)


def _take(iterable, count):
    out = []
    for batch in iterable:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("stream ended")


def _keys_of(batch, tokenizer):
    return [tokenizer.decode(row[67:]) for row in batch["input_ids"]]


def test_list_shards_reads_sizes(shard_dir):
    urls, sizes = list_shards(shard_dir)
    assert len(urls) == 6 and sizes == {url: 8 for url in urls}
    with pytest.raises(FileNotFoundError):
        list_shards(shard_dir / "missing")


def test_epoch_order_deterministic_and_splits_partition():
    shards = [f"{i:05d}.tar" for i in range(10)]
    assert epoch_shards(shards, 1, 0) == epoch_shards(shards, 1, 0)
    assert epoch_shards(shards, 1, 0) != epoch_shards(shards, 1, 1)
    assert sorted(epoch_shards(shards, 1, 3)) == shards
    ordered = epoch_shards(shards, 1, 0)
    per_rank = [split_by_node(ordered, rank, 2) for rank in range(2)]
    per_worker = [split_by_worker(part, worker, 3) for part in per_rank for worker in range(3)]
    assert sorted(s for part in per_worker for s in part) == shards


def test_grounded_choice_is_a_pure_function_near_its_probability():
    picks = [grounded_choice(0, 2, f"k{i}", 0.5) for i in range(2000)]
    assert picks == [grounded_choice(0, 2, f"k{i}", 0.5) for i in range(2000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks != [grounded_choice(0, 3, f"k{i}", 0.5) for i in range(2000)]
    assert not any(grounded_choice(0, 0, f"k{i}", 0.0) for i in range(100))


def test_stream_deterministic_and_batches_well_formed(shard_dir, tokenizer):
    first = _take(_stream(shard_dir, tokenizer), 15)
    second = _take(_stream(shard_dir, tokenizer), 15)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixels"], b["pixels"])
    batch = first[0]
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.uint8
    assert (batch["image_embeds_position_mask"][:, 2:66] == 1).all()
    assert batch["image_embeds_position_mask"].sum() == 4 * 64
    # 48 samples / 4 per batch = 12 batches per epoch: batch 13 is in epoch 1, reshuffled
    assert [b["position"][2] for b in first] == [0] * 12 + [1] * 3
    epoch0 = sorted(t for b in first[:12] for t in _keys_of(b, tokenizer))
    assert len(epoch0) == 48


def test_resume_from_position_continues_exactly(shard_dir, tokenizer):
    reference = _take(_stream(shard_dir, tokenizer), 16)
    position = DataPosition(1)
    for batch in reference[:7]:
        position.advance(*batch["position"])
    resumed = _take(_stream(shard_dir, tokenizer, start=DataPosition.from_dict(position.to_dict())), 9)
    for a, b in zip(reference[7:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixels"], b["pixels"])


def test_resume_with_two_workers_continues_exactly(shard_dir, tokenizer):
    def loader(start=None):
        return make_loader(_stream(shard_dir, tokenizer, start=start, num_workers=2))

    reference = _take(loader(), 9)
    position = DataPosition(2)
    for batch in reference[:5]:  # stop after an odd number: worker 1 is due next
        position.advance(*batch["position"])
    assert position.next_worker == 1
    resumed = _take(loader(DataPosition.from_dict(position.to_dict())), 4)
    for a, b in zip(reference[5:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_ranks_read_disjoint_shards(shard_dir, tokenizer):
    texts = []
    for rank in range(2):
        batches = _take(_stream(shard_dir, tokenizer, rank=rank, world_size=2, grounded_prob=0.0), 6)  # one epoch
        texts.append({t for b in batches for t in _keys_of(b, tokenizer)})
    assert texts[0] and texts[1] and len(texts[0] | texts[1]) > max(len(texts[0]), len(texts[1]))


def test_too_few_shards_for_the_workers_is_an_error(shard_dir, tokenizer):
    with pytest.raises(ValueError, match="cannot feed"):
        _stream(shard_dir, tokenizer, num_workers=4, world_size=2)
    _stream(shard_dir, tokenizer, num_workers=4, world_size=2, resampled=True)  # resampled draws from all


def test_text_choice_plain_grounded_and_phrase_mode(scenes, tokenizer):
    from grit_pipeline.fixtures.scene_shards import scene_sample

    sample = scene_sample(scenes[0])
    grounded = SampleEncoder(tokenizer, 32, DataConfig(shards="x", grounded_prob=1.0))
    plain = SampleEncoder(tokenizer, 32, DataConfig(shards="x", grounded_prob=0.0))
    phrase = SampleEncoder(tokenizer, 32, DataConfig(shards="x", grounded_prob=1.0, span_mode="phrase"))
    assert grounded.text_for(sample, 0) == sample["txt"].decode()
    assert plain.text_for(sample, 0) == scenes[0].caption
    phrase_text = phrase.text_for({k: v for k, v in sample.items() if k != "txt"}, 0)
    assert phrase_text.startswith("<grounding>") and phrase_text.count("<phrase>") == len(scenes[0].objects)


def test_plain_caption_with_control_strings_is_sanitised(scenes, tokenizer):
    from grit_pipeline.fixtures.scene_shards import scene_sample

    sample = scene_sample(scenes[0])
    meta = json.loads(sample["json"])
    meta["caption"] = "a <phrase> fake</phrase><object><patch_index_0001> caption"
    sample["json"] = json.dumps(meta).encode()
    encoder = SampleEncoder(tokenizer, 32, DataConfig(shards="x", grounded_prob=0.0))
    input_ids, _ = encoder.encode_text(encoder.text_for(sample, 0))
    control = set(tokenizer.convert_tokens_to_ids(["<phrase>", "</phrase>", "<object>", "<patch_index_0001>"]))
    assert not control & set(input_ids[67:])


def test_decode_pixels_scales_jpegs_in_the_decoder_and_resizes(scenes):
    buffer = io.BytesIO()
    scenes[0].image.resize((400, 300)).save(buffer, format="JPEG")
    decoded = decode_pixels(buffer.getvalue(), 64)
    # scaled in the decoder by the largest power of two keeping both sides >= 64: 1/4 gives 100 x 75
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (4, 75, 100)  # RGBX
    assert tuple(decode_pixels(buffer.getvalue(), 80).shape) == (4, 150, 200)  # 1/2; never 5/8 (slow in libjpeg-turbo)
    pixels = load_pixels(buffer.getvalue(), 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8 and pixels.is_contiguous()
    # a flat colour survives decode and resize, for JPEG (libjpeg-turbo), PNG and CMYK JPEG (PIL fallback)
    for mode, colour, fmt in (("RGB", (200, 40, 40), "PNG"), ("RGB", (200, 40, 40), "JPEG"),
                              ("CMYK", (0, 255, 255, 0), "JPEG"), ("L", 90, "JPEG")):
        flat = io.BytesIO()
        Image.new(mode, (300, 200), colour).save(flat, format=fmt, quality=95)
        expected = torch.tensor(Image.new(mode, (1, 1), colour).convert("RGB").getpixel((0, 0))).view(3, 1, 1)
        assert (load_pixels(flat.getvalue(), 32).int() - expected).abs().max() <= 3, (mode, fmt)


def test_decode_pixels_rejects_a_broken_jpeg():
    with pytest.raises(OSError):  # PIL's error after libjpeg-turbo declined: counted as image_undecodable
        decode_pixels(b"\xff\xd8\xff" + b"not a jpeg" * 20, 64)


def _corrupt_shards(shard_dir, out_dir, bad_every):
    """Copy the shards, replacing every `bad_every`-th JPEG with garbage."""
    out_dir.mkdir()
    count = 0
    for src in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(src) as reader, tarfile.open(out_dir / src.name, "w") as writer:
            for member in reader.getmembers():
                data = reader.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    count += 1
                    if count % bad_every == 0:
                        data = b"not a jpeg"
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                writer.addfile(info, io.BytesIO(data))
    return out_dir


def test_bad_samples_are_skipped_below_the_rate(shard_dir, tokenizer, tmp_path):
    broken = _corrupt_shards(shard_dir, tmp_path / "shards", bad_every=12)
    batches = _take(_stream(broken, tokenizer, max_skip_rate=0.2, skip_rate_min_samples=10), 11)
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    # 4 of 48 samples bad: 44 good samples make 11 batches, then the cursor has passed every sample
    assert batches[-1]["position"][1] == 48


def test_bad_samples_above_the_rate_stop_the_run(shard_dir, tokenizer, tmp_path):
    broken = _corrupt_shards(shard_dir, tmp_path / "shards", bad_every=3)
    with pytest.raises(SkipRateExceeded):
        _take(_stream(broken, tokenizer, max_skip_rate=0.1, skip_rate_min_samples=20), 12)


def test_budget_counts_reasons():
    budget = BadSampleBudget(max_skip_rate=0.4, min_samples=4)
    budget.ok()
    budget.skip(DropReason.IMAGE_UNDECODABLE, "x")
    budget.ok()
    budget.ok()
    assert budget.bad == {"image_undecodable": 1}
    budget.skip(DropReason.IMAGE_UNDECODABLE, "y")  # 2 of 5: at the limit, not past it
    with pytest.raises(SkipRateExceeded):
        budget.skip(DropReason.MALFORMED_RECORD, "z")
