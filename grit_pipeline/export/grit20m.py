"""`grit export --format grit20m`: the kept rows of a build as one parquet file in exactly GRIT-20M's columns."""

from __future__ import annotations

from pathlib import Path

from grit_pipeline.export.reader import (
    ExportError,
    ExportResult,
    check_targets,
    incomplete_shards,
    open_build,
)
from grit_pipeline.io import atomic_path
from grit_pipeline.records import GRIT20M_SCHEMA

ROWS_PER_BATCH = 4096


def export_grit20m(out: str | Path, to: str | Path, rows_per_batch: int = ROWS_PER_BATCH) -> ExportResult:
    """Write the kept rows of OUT's shard parquet files to `to` in GRIT20M_SCHEMA, batch by batch."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder, manifest = open_build(out)
    target = Path(to)
    check_targets(folder, target, None)
    result = ExportResult(target, "grit20m", warnings=incomplete_shards(manifest))
    columns = [*GRIT20M_SCHEMA.names, "status"]
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, GRIT20M_SCHEMA) as writer:
        for entry in manifest["shards"]:
            if entry["status"] != "complete":
                continue
            name = (entry.get("parquet") or {}).get("name") or f"{entry['name']}.parquet"
            path = folder / "shards" / name
            kept = 0
            try:
                parquet = pq.ParquetFile(path)
                for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=columns):
                    rows = batch.filter(pc.equal(batch.column("status"), "kept"))
                    if rows.num_rows:
                        table = pa.Table.from_batches([rows])
                        writer.write_table(table.select(GRIT20M_SCHEMA.names).cast(GRIT20M_SCHEMA))
                        kept += rows.num_rows
            except (OSError, pa.ArrowException, KeyError) as exc:
                raise ExportError(f"{path}: cannot read the shard's parquet: {exc}") from exc
            if kept != entry.get("samples", kept):
                raise ExportError(f"{path.name}: {kept} kept rows, the manifest says {entry['samples']}")
            result.samples += kept
    return result
