"""Integration: the real img2dataset (dev extra) downloads GRIT-style rows from a loopback HTTP server in each
resize mode, EXIF-rotated JPEGs among them; `grit build` puts every kept box on its square in the stored
pixels."""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grit_pipeline.build import run_build
from grit_pipeline.config import BuildConfig
from grit_pipeline.fixtures.square_scenes import (
    CAPTION,
    COLOURS,
    SPANS,
    box_near,
    colour_box,
    grit_entries,
    jpeg_bytes,
    square_scene,
)
from grit_pipeline.records import Box

pytest.importorskip("img2dataset")
pytestmark = pytest.mark.integration  # real img2dataset processes and a loopback HTTP server

MODES = ("border", "center_crop", "keep_ratio", "no")
# name -> (raw width, raw height, EXIF orientation, squares in raw pixels)
IMAGES = {
    "land": (300, 200, 1, {"red": (100, 66, 150, 116), "blue": (0, 130, 30, 170)}),
    "port": (180, 260, 1, {"red": (60, 86, 110, 136), "blue": (0, 160, 30, 200)}),
    "exif6": (160, 100, 6, {"red": (20, 10, 60, 40), "blue": (100, 50, 130, 80)}),
    "exif3": (150, 120, 3, {"red": (10, 10, 50, 50), "blue": (90, 60, 130, 100)}),
}


@pytest.fixture()
def http_root(tmp_path: Path):
    """A loopback HTTP server over a folder of the test images, stopped by the test itself."""
    root = tmp_path / "www"
    root.mkdir()
    for name, (width, height, orientation, squares) in IMAGES.items():
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(square_scene(width, height, squares), orientation))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _url_list(path: Path, base_url: str) -> Path:
    """GRIT-20M-shaped rows (boxes normalised to the raw frame, as GRIT's detector saw the files); the entries
    as JSON text, since img2dataset cannot save list columns (docs/output-format.md)."""
    rows = []
    for number, (name, (width, height, _orientation, squares)) in enumerate(IMAGES.items()):
        boxes = {n: list(Box.from_pixels(*b, width, height).as_tuple()) for n, b in squares.items()}
        rows.append({"url": f"{base_url}/{name}.jpg", "caption": CAPTION, "id": number,
                     "noun_chunks": json.dumps(grit_entries(boxes)), "ref_exps": json.dumps(grit_entries(boxes))})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _download(url_list: Path, root: Path) -> list[str]:
    """Run img2dataset once per resize mode (concurrently: most of a run is its start-up); the output folders."""
    runs = {}
    for mode in MODES:
        command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(url_list), "--input_format",
                   "parquet", "--caption_col", "caption", "--save_additional_columns",
                   '["id","noun_chunks","ref_exps"]', "--output_folder", str(root / mode), "--output_format",
                   "webdataset", "--resize_mode", mode, "--image_size", "128", "--processes_count", "1",
                   "--thread_count", "2", "--enable_wandb", "False"]
        runs[mode] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for mode, process in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()[-2000:]
        tar = root / mode / "00000.tar"
        with tarfile.open(tar) as members:  # img2dataset counts a sample it failed to write as a success
            assert len([m for m in members.getmembers() if m.name.endswith(".jpg")]) == len(IMAGES), mode
    return [str(root / mode) for mode in MODES]


@pytest.mark.timeout(600)  # 83 s on 2 cores; each img2dataset run may take 300 s before _download gives up
def test_real_img2dataset_output_in_every_resize_mode(tmp_path: Path, http_root: str) -> None:
    url_list = _url_list(tmp_path / "urls.parquet", http_root)
    config = BuildConfig(inputs=tuple(_download(url_list, tmp_path)), out_dir=str(tmp_path / "out"), grounder="annotations", runner="local")
    result = run_build(config)
    assert result.ok

    checked = 0
    for index, mode in enumerate(MODES):
        shard = tmp_path / "out" / "shards" / f"{index:05d}"
        rows = {row["url"].rsplit("/", 1)[1].removesuffix(".jpg"): row
                for row in pq.read_table(f"{shard}.parquet").to_pylist()}
        with tarfile.open(f"{shard}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, row in rows.items():
            assert row["status"] == "kept", (mode, name, row["drop_reason"], row["error_message"])
            image = Image.open(io.BytesIO(members[f"{row['key']}.jpg"]))
            meta = json.loads(members[f"{row['key']}.json"])
            assert (meta["width"], meta["height"]) == IMAGES[name][:2]  # the original's size, as GRIT-20M
            assert (meta["stored_width"], meta["stored_height"]) == image.size
            cut = mode == "center_crop" and name == "land"  # its blue square lies in the cropped-off strip
            seen = set()
            for start, end, *box, _score in meta["noun_chunks"]:
                colour = "red" if (start, end) == SPANS["red"] else "blue"
                seen.add(colour)
                assert box_near(Box(*box), colour_box(image, COLOURS[colour]), image), (mode, name, colour)
                checked += 1
            assert seen == ({"red"} if cut else {"red", "blue"}), (mode, name)
            assert json.loads(row["span_drops"] or "{}").get("box_cropped_out", 0) == (1 if cut else 0)
    assert checked == 2 * len(MODES) * len(IMAGES) - 1
