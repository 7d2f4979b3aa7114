"""Input readers: img2dataset folders, captions.jsonl folders, GRIT-20M parquet, and hostile inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.fixtures.img2dataset import (
    Img2DatasetSample,
    add_member,
    scene_samples,
    write_img2dataset_folder,
)
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.inputs import InputError, discover_shards
from grit_pipeline.inputs.tar import is_safe_member_name, split_member_name
from grit_pipeline.records import DropReason, write_grit_parquet


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(6, seed=3, size=(64, 64))


def test_img2dataset_folder_reads_samples_and_failed_downloads(tmp_path: Path, scenes) -> None:
    samples = scene_samples(scenes[:3])
    samples.append(Img2DatasetSample("a lost image", "https://example.com/x.jpg", None, error_message="timeout"))
    folder = write_img2dataset_folder([samples, scene_samples(scenes[3:])], tmp_path / "in")
    shards = discover_shards([str(folder)])
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"]
    first = shards[0].read()
    assert first.errors == []
    assert [s.source_key for s in first.samples] == ["000000000", "000000001", "000000002", "000000003"]
    assert first.samples[0].caption == scenes[0].caption
    assert first.samples[0].image is not None and first.samples[0].image.startswith(b"\xff\xd8")
    assert first.samples[0].has_grit_entries()
    assert first.samples[0].fields["id"] == 0
    failed = first.samples[3]
    assert failed.image is None and failed.image_error is DropReason.IMAGE_MISSING
    assert "timeout" in (failed.error_message or "")
    assert len(shards[1].read().samples) == 3


def test_truncated_tar_keeps_what_was_readable(tmp_path: Path, scenes) -> None:
    folder = write_img2dataset_folder([scene_samples(scenes)], tmp_path / "in")
    tar = folder / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    (folder / "00000.parquet").unlink()
    contents = discover_shards([str(folder)])[0].read()
    assert 0 < len(contents.samples) < len(scenes)
    assert len(contents.errors) == 1 and "unreadable after" in contents.errors[0]


def test_hostile_member_names_are_malformed_samples_and_nothing_is_written(tmp_path: Path, scenes) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    jpg = scene_samples(scenes[:1])[0].image
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name in ("../evil.jpg", "../evil.txt", "/abs/x.jpg", "/abs/x.txt", "ok.jpg", "ok.txt", "ok.jpg",
                     "a/../../b.jpg", "a/../../b.txt"):
            add_member(tar, name, jpg if name.endswith(".jpg") else b"a red circle")
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    contents = discover_shards([str(folder)])[0].read()
    by_key = {s.source_key: s for s in contents.samples}
    for key in ("../evil", "/abs/x", "a/../../b"):
        assert by_key[key].caption is None and "unsafe member name" in (by_key[key].error_message or "")
    assert by_key["ok"].caption == "a red circle" and "duplicate member" in (by_key["ok"].error_message or "")
    assert by_key["link"].image is None and "non-regular" in (by_key["link"].error_message or "")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.jpg").exists()


def test_member_name_helpers() -> None:
    assert split_member_name("dir/000.tar.jpg") == ("dir/000", "tar.jpg")
    assert split_member_name("000123.JSON") == ("000123", "json")
    assert not is_safe_member_name("../x") and not is_safe_member_name("/x") and not is_safe_member_name("a\\b")
    assert is_safe_member_name("a/b/c.jpg")


def test_captions_folder_is_split_into_shards_and_rejects_escaping_paths(tmp_path: Path, scenes) -> None:
    jsonl = write_scene_folder(scenes, tmp_path / "in")
    with open(jsonl, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"image": "../outside.jpg", "caption": "a cat"}) + "\n")
        handle.write("{not json\n")
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    shards = discover_shards([str(tmp_path / "in")], samples_per_shard=4)
    assert [s.name for s in shards] == ["captions.jsonl[0:4]", "captions.jsonl[4:8]"]
    samples = [s for shard in shards for s in shard.read().samples]
    assert len(samples) == 8
    assert samples[0].source_key == scenes[0].key and samples[0].fields["annotations"]
    assert samples[6].image is None and "unsafe" in (samples[6].error_message or "")
    assert samples[7].caption is None


def test_grit_parquet_rows_find_their_images_by_id(tmp_path: Path, scenes) -> None:
    images = write_img2dataset_folder([scene_samples(scenes[:4]), scene_samples(scenes[4:])], tmp_path / "rows")
    # img2dataset numbers ids per call; make them global as GRIT-20M ids are.
    for index in (0, 1):
        table = pq.read_table(images / f"0000{index}.parquet").to_pylist()
        for row in table:
            row["id"] = int(row["key"])
        pq.write_table(pa.Table.from_pylist(table), images / f"0000{index}.parquet")
    records = []
    for number, scene in enumerate(scenes):
        record = scene.to_record()
        record.id = number if number < 4 else 10000 + number - 4
        records.append(record)
    write_grit_parquet(records, str(tmp_path / "rows.parquet"))
    shards = discover_shards([str(tmp_path / "rows.parquet")], samples_per_shard=5)
    assert len(shards) == 2 and shards[0].images == str(images)
    samples = [s for shard in shards for s in shard.read().samples]
    assert len(samples) == 6 and all(s.image is not None for s in samples)
    assert samples[5].caption == scenes[5].caption and samples[5].has_grit_entries()


def test_unknown_input_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an img2dataset folder"):
        discover_shards([str(tmp_path / "empty")])


def test_bad_json_member_is_recorded(tmp_path: Path, scenes) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    buffer = io.BytesIO()
    scenes[0].image.save(buffer, format="JPEG")
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add_member(tar, "000.jpg", buffer.getvalue())
        add_member(tar, "000.json", b"{broken")
        add_member(tar, "000.txt", b"a red circle")
    sample = discover_shards([str(folder)])[0].read().samples[0]
    assert sample.caption == "a red circle" and "bad .json" in (sample.error_message or "")


def test_ten_thousand_tars_are_listed_without_being_opened(tmp_path: Path) -> None:
    from grit_pipeline.inputs import discover_shards

    folder = tmp_path / "downloads"
    folder.mkdir()
    for index in range(10_000):  # empty files: opening any of them as a tar would fail
        (folder / f"{index:05d}.tar").touch()
    shards = discover_shards([str(folder)])
    assert len(shards) == 10_000 and shards[-1].name == "09999.tar"


def test_an_input_file_rewritten_under_the_same_name_changes_its_fingerprint(tmp_path: Path) -> None:
    import os

    from grit_pipeline.inputs import fingerprint_inputs

    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"a" * 10)
    before = fingerprint_inputs([str(folder)])
    (folder / "00000.tar").write_bytes(b"b" * 10)  # same name, same size
    os.utime(folder / "00000.tar", ns=(1, 1))
    after = fingerprint_inputs([str(folder)])
    assert before[0]["bytes"] == after[0]["bytes"] == 10 and before[0]["digest"] != after[0]["digest"]


def test_grit_parquet_rows_find_their_images_in_the_aligned_tar_only(tmp_path: Path, monkeypatch) -> None:
    """img2dataset keeps the parquet's order: rows [4, 8) are in the second tar, and only its columns are read
    (no index of the whole folder); rows downloaded nowhere fall back to scanning every tar."""
    from grit_pipeline.fixtures.img2dataset import scene_samples, write_img2dataset_folder
    from grit_pipeline.fixtures.synthetic import generate_scenes
    from grit_pipeline.inputs import discover_shards, grit_parquet
    from grit_pipeline.records import write_grit_parquet

    scenes = generate_scenes(12, seed=4, size=(48, 48))
    images = write_img2dataset_folder([scene_samples(scenes[i:i + 4], grit_columns=False) for i in (0, 4, 8)],
                                      tmp_path / "images")
    records = []
    for scene in scenes:
        record = scene.to_record()
        record.url = f"https://example.com/{scene.key}.jpg"
        records.append(record)
    write_grit_parquet(records, str(tmp_path / "rows.parquet"))
    read: list[str] = []
    original = grit_parquet._tar_index
    monkeypatch.setattr(grit_parquet, "_tar_index", lambda folder, tar: read.append(tar) or original(folder, tar))
    shards = discover_shards([str(tmp_path / "rows.parquet")], samples_per_shard=4, images_dir=str(images))
    contents = shards[1].read()
    assert read == ["00001.tar"]
    assert [s.image is not None for s in contents.samples] == [True] * 4
    assert [s.url for s in contents.samples] == [r.url for r in records[4:8]]
