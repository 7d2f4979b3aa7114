"""`python -m grit_pipeline.demo` (`make demo`): the whole main job, offline, on a bundled sample.

Inputs: five real photos with permissive licences (grit_pipeline/data/demo, see LICENSES.md) with captions
and hand-drawn boxes bound to caption spans, plus a generated set of synthetic shape scenes with exact
boxes. Both are folders of images with a captions.jsonl. The demo runs `grit build` with the annotation
grounder (GroundingDINO weights cannot be fetched offline), then `grit audit` and `grit inspect --html`,
and prints the summary. A real run on a GPU machine replaces `--grounder annotations` with
`--grounder grounding-dino --detector IDEA-Research/grounding-dino-tiny` (see README).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PHOTOS_DIR = Path(__file__).resolve().parent / "data" / "demo"
GPU_COMMAND = "--grounder grounding-dino --detector IDEA-Research/grounding-dino-tiny --runner ray"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds, and how."""

    out_dir: str = "demo_out"
    synthetic_scenes: int = 24
    seed: int = 0
    runner: str = "local"
    samples_per_shard: int = 16
    gallery_samples: int = 50

    def __post_init__(self) -> None:
        if self.synthetic_scenes < 0 or self.samples_per_shard < 1 or self.gallery_samples < 1:
            raise ValueError("synthetic_scenes must be >= 0, samples_per_shard and gallery_samples >= 1")
        if self.runner not in ("local", "ray"):
            raise ValueError(f"runner must be 'local' or 'ray', got {self.runner!r}")


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its build and report, and whether the build and the audit passed."""

    build_dir: Path
    report_html: Path
    build_ok: bool
    audit_ok: bool
    summary: str
    audit_text: str

    @property
    def ok(self) -> bool:
        """True when every shard was written and the audit found nothing."""
        return self.build_ok and self.audit_ok


def prepare_inputs(config: DemoConfig) -> list[Path]:
    """The input folders: the bundled photos, the synthetic scenes and the web-noise samples (under OUT/inputs)."""
    from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

    inputs = [PHOTOS_DIR]
    root = Path(config.out_dir) / "inputs"
    shutil.rmtree(root, ignore_errors=True)
    if config.synthetic_scenes:
        write_scene_folder(generate_scenes(config.synthetic_scenes, seed=config.seed), root / "synthetic")
        inputs.append(root / "synthetic")
    inputs.append(write_noisy_folder(root / "noisy", seed=config.seed + 1))
    return inputs


def write_noisy_folder(folder: Path, seed: int) -> Path:
    """Samples as the web delivers them, so the build's drop accounting has something to count.

    A caption with no noun chunk, one with only abstract nouns, a missing and a truncated image, a box
    whose category names nothing in the caption (all dropped, each for its reason), and a caption that
    contains literal Kosmos-2 control tokens (kept, with '<' and '>' escaped).
    """
    import json

    from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

    scenes = generate_scenes(4, seed=seed)
    write_scene_folder(scenes, folder)
    whole = [0.1, 0.1, 0.9, 0.9]
    (folder / "truncated.jpg").write_bytes((folder / f"{scenes[0].key}.jpg").read_bytes()[:400])
    control = "<grounding> an icon: <phrase> " + scenes[3].caption + " </phrase>"
    shape = scenes[3].objects[0]
    start = control.index(shape.span.text(scenes[3].caption))
    entries = [
        {"image": f"{scenes[0].key}.jpg", "caption": "Wow!!! :)", "annotations": []},
        {"image": f"{scenes[1].key}.jpg", "caption": "love and happiness",
         "annotations": [{"category": "love", "box": whole}]},
        {"image": "missing.jpg", "caption": scenes[1].caption, "annotations": [scenes[1].objects[0].annotation()]},
        {"image": "truncated.jpg", "caption": scenes[0].caption, "annotations": [scenes[0].objects[0].annotation()]},
        {"image": f"{scenes[2].key}.jpg", "caption": "a green bicycle by the road",
         "annotations": [{"category": "car", "box": whole}]},
        {"image": f"{scenes[3].key}.jpg", "caption": control, "annotations": [
            {"category": shape.shape, "box": list(shape.box.as_tuple()), "span": [start, start + shape.span.end - shape.span.start]}]},
    ]  # fmt: skip
    (folder / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return folder


def run_demo(config: DemoConfig, stream: TextIO = sys.stdout) -> DemoResult:
    """Build, audit and inspect the demo sample; prints progress and the summary to `stream`."""
    from grit_pipeline.build import run_build, summary_table
    from grit_pipeline.config import build_config
    from grit_pipeline.manifests.audit import audit_build
    from grit_pipeline.manifests.gallery import write_gallery

    out = Path(config.out_dir)
    inputs = prepare_inputs(config)
    build_dir = out / "build"
    print(f"[1/3] grit build {' '.join(str(p) for p in inputs)} --out {build_dir} "
          f"--grounder annotations --runner {config.runner}", file=stream)  # fmt: skip
    build = build_config(tuple(str(p) for p in inputs), str(build_dir), grounder="annotations",
                         runner=config.runner, samples_per_shard=config.samples_per_shard)
    result = run_build(build, overwrite=True, stream=stream)
    summary = summary_table(result)
    print(f"[2/3] grit audit {build_dir}", file=stream)
    report = audit_build(build_dir)
    print(report.format_text(), file=stream)
    report_html = out / "report.html"
    print(f"[3/3] grit inspect {build_dir} --html {report_html}", file=stream)
    shown = write_gallery(build_dir, report_html, count=config.gallery_samples)
    print(f"wrote {report_html} ({shown} samples)", file=stream)
    return DemoResult(build_dir, report_html, result.ok, report.ok, summary, report.format_text())


def _parse_args(argv: list[str] | None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="python -m grit_pipeline.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="Output folder (rebuilt on every run).")
    parser.add_argument("--synthetic", type=int, default=24, help="Synthetic shape scenes to add.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic scenes.")
    parser.add_argument("--runner", choices=("local", "ray"), default="local", help="Pipeline runner.")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    args = parser.parse_args(argv)
    return DemoConfig(out_dir=args.out, synthetic_scenes=args.synthetic, seed=args.seed, runner=args.runner,
                      samples_per_shard=args.samples_per_shard)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit status 0 when the build and its audit both pass."""
    config = _parse_args(argv)
    inputs = " ".join(str(p) for p in [PHOTOS_DIR, Path(config.out_dir) / "inputs" / "synthetic"])
    result = run_demo(config)
    print("\nsummary\n" + result.summary)
    print(f"\nshards:  {result.build_dir / 'shards'}\nreport:  {result.report_html}")
    print(f"audit:   {'OK' if result.audit_ok else 'FAILED'}")
    print("\nOn a GPU machine (with the detector weights), ground with GroundingDINO instead of the annotations:")
    print(f"  grit build {inputs} --out demo_gpu {GPU_COMMAND}")
    return 0 if result.ok else 1


def run_quietly(config: DemoConfig) -> tuple[DemoResult, str]:
    """Run the demo capturing its output (for tests)."""
    buffer = io.StringIO()
    return run_demo(config, stream=buffer), buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
