"""`grit train`, `grit generate` and `grit bench loader`: the bundled Kosmos-2 trainer's commands."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click


@click.command()
@click.option("--shards", required=True, help="A build's shards folder (OUT/shards), one .tar, or a brace pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (config, processor, checkpoints).")
@click.option("--preset", default="tiny", show_default=True, help="Architecture for training from scratch: tiny | kosmos-2.")
@click.option("--init", "init", default=None, help="Fine-tune a pretrained checkpoint (folder or hub id) with its own processor.")
@click.option("--dropout", type=float, default=None, help="Override the preset's dropout (tiny: 0, kosmos-2: 0.1).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default 1000; with --resume: the saved run's).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per device, per micro-step.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=375, show_default=True, help="GRIT.md section 6 default; scale down for short runs.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--workers", "num_workers", type=int, default=2, show_default=True, help="DataLoader workers per process.")
@click.option("--shuffle-buffer", type=int, default=1000, show_default=True)
@click.option("--resampled", is_flag=True, help="Draw shards with replacement (multi-node runs without epochs).")
@click.option("--grounded-prob", type=float, default=0.5, show_default=True,
              help="Probability a sample is shown grounded, else as its plain caption (unilm --use-object-bbox-prob).")
@click.option("--span-mode", type=click.Choice(["expression", "phrase"]), default="expression", show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--max-skip-rate", type=float, default=0.05, show_default=True, help="Stop when more bad samples than this.")
@click.option("--vocab-size", type=int, default=4000, show_default=True, help="BPE size of a tokenizer built from the shards.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--time-budget", "time_budget_s", type=float, default=None, help="Stop (with a checkpoint) after this many seconds.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint (its saved config; --steps may extend it).")
def train(**options: object) -> None:
    """Train Kosmos-2 on built shards; prints a JSON summary.

    Shards, --init, --device and a resumed run's config are checked before anything is written: a run that
    cannot start exits 1 with one line and leaves --out as it was.
    """
    from grit_pipeline.model.config import TrainConfig, TrainInputError, resume_config
    from grit_pipeline.model.data import DataConfig
    from grit_pipeline.model.train import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    resume = bool(options.pop("resume"))
    out = str(options["out"])
    try:  # ValueError: an option the configs refuse, or (TrainInputError) a saved config that cannot be read
        if resume and (Path(out) / "config.json").exists():
            config = resume_config(out, steps=options["steps"])
        else:
            data_fields = ("shards", "batch_size", "num_workers", "shuffle_buffer", "resampled", "grounded_prob",
                           "span_mode", "max_length", "max_skip_rate", "seed")
            options["steps"] = options["steps"] or 1000
            data = DataConfig(**{name: options[name] for name in data_fields})
            rest = {k: v for k, v in options.items() if k not in data_fields or k == "seed"}
            config = TrainConfig(data=data, **rest)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        result = run_training(config, resume=resume)
    except TrainInputError as exc:  # raised by check_run, before anything is written
        raise click.ClickException(str(exc)) from exc
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    click.echo(json.dumps({"step": result.step, "final_loss": result.losses[-1] if result.losses else None,
                           "samples_per_s": round(result.samples_per_s, 2), "checkpoint": result.checkpoint}))


@click.command()
@click.option("--checkpoint", required=True, help="A checkpoint folder (RUN/checkpoints/step_N), a run folder, or a hub id.")
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", default="<grounding> An image of", show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--png", "png_path", default=None, type=click.Path(dir_okay=False), help="Also draw the boxes into this PNG.")
@click.option("--device", default="auto", show_default=True)
def generate(checkpoint: str, image_path: str, prompt: str, max_new_tokens: int, png_path: str | None, device: str) -> None:
    """Grounded generation: prints text, caption and entities with boxes as JSON.

    The image, --png's folder and the checkpoint are checked before the model loads: a missing or empty
    checkpoint (or a hub id that is not cached, offline, or whose hub cannot be reached) exits 1 with one line.
    """
    from PIL import Image

    from grit_pipeline.model.generate import Generator, draw_entities, resolve_checkpoint

    try:
        with Image.open(image_path) as opened:
            opened.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise click.ClickException(f"cannot read {image_path} as an image: {exc}") from exc
    if png_path and not Path(png_path).resolve().parent.is_dir():
        raise click.ClickException(f"--png {png_path}: folder {Path(png_path).parent} does not exist")
    try:
        source = resolve_checkpoint(checkpoint)  # CheckpointError: missing, empty, not cached, hub unreachable
        from grit_pipeline.model.config import check_device  # imports torch: after the cheap checks

        check_device(device)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        generator = Generator(source, device=device)
    except (OSError, ValueError) as exc:  # found, but transformers cannot load it
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"cannot load checkpoint {source}: {first_line}") from exc
    image_bytes = Path(image_path).read_bytes()
    result = generator.generate(image_bytes, prompt, max_new_tokens)
    if png_path:
        draw_entities(Image.open(image_path), result, png_path)
    click.echo(json.dumps(result.to_dict(), ensure_ascii=False))


@click.command()
@click.option("--shards", default=None, help="Shards to read; default: synthetic scenes written to a temp folder.")
@click.option("--samples", type=int, default=2000, show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True, help="Model input size the loader resizes to.")
@click.option("--source-size", type=int, default=384, show_default=True, help="Size of the synthetic JPEGs.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Interleaved repeats; the best of each is kept.")
def bench_loader(shards: str | None, samples: int, image_size: int, source_size: int, batch_size: int,
                 repeats: int) -> None:
    """Loader samples/s (decode, tokenize, collate) per worker vs a plain webdataset decode loop."""
    import tarfile

    from grit_pipeline.model.bench import bench_loader as run_bench

    try:
        report = run_bench(shards, samples, image_size, source_size, batch_size, repeats)
    except FileNotFoundError as exc:  # no shards where --shards says
        raise click.ClickException(str(exc)) from exc
    except (OSError, ValueError, tarfile.TarError) as exc:
        if shards is None:
            raise  # the synthetic shards written here: not the user's
        raise click.ClickException(f"cannot read the shards at {shards}: {type(exc).__name__}: {exc}") from exc
    click.echo(json.dumps(report, indent=2))
