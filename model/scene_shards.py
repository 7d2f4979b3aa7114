"""Write synthetic scenes straight into `grit build`-layout shards (KEY.jpg/.json/.txt, sizes.json).

The trainer's tests use this where the real `grit build` would only cost time; the sample layout is the one
`grit build` writes, so the loader cannot tell them apart.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grit_pipeline.io import write_json_atomic
from grit_pipeline.synthetic import Scene


def scene_sample(scene: Scene, quality: int = 90) -> dict[str, Any]:
    """One shard sample of a scene: JPEG bytes, the GRIT-20M json and the expression-mode grounded text."""
    from grit_pipeline.stages.serialize import SerializeConfig, serialize_record

    record = scene.to_record()
    buffer = io.BytesIO()
    scene.image.save(buffer, format="JPEG", quality=quality)
    text = serialize_record(record, SerializeConfig(mode="expression")).text
    row = record.to_row()
    row["provenance"] = {"source": "synthetic", "grounder": "annotation"}
    return {
        "__key__": scene.key,
        "jpg": buffer.getvalue(),
        "json": json.dumps(row).encode("utf-8"),
        "txt": (text or "").encode("utf-8"),
    }


def write_scene_shards(scenes: Sequence[Scene], out_dir: str | Path, per_shard: int = 100) -> Path:
    """Write scenes as OUT/shards/NNNNN.tar plus OUT/shards/sizes.json; returns the shards folder."""
    import webdataset as wds

    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for start in range(0, len(scenes), per_shard):
        name = f"{start // per_shard:05d}.tar"
        chunk = scenes[start : start + per_shard]
        with open(shard_dir / name, "wb") as handle, wds.TarWriter(handle) as writer:
            for scene in chunk:
                writer.write(scene_sample(scene))
        sizes[name] = len(chunk)
    write_json_atomic(Path(out_dir) / "shards" / "sizes.json", sizes)
    return shard_dir
