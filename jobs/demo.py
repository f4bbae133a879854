"""``make demo``: a complete job on generated images with seeded tiny checkpoints.

No model hub is needed: if the demo config's model folders do not exist, small
seeded DPT checkpoints are written there with ``save_pretrained`` and loaded
through the same code path as real checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpt_model.seeded import build_seeded_checkpoint
from jobs.config import ConfigError, add_override_argument, load_config
from jobs.run import EXIT_CONFIG_ERROR, format_summary
from jobs.sample_images import write_demo_images

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description="Annotate generated sample images with seeded tiny checkpoints, "
        "as jobs/configs/demo.yaml says; models and images are made where missing.",
    )
    add_override_argument(parser, "output.uri=/tmp/demo")
    parser.add_argument(
        "bare_overrides", nargs="*", metavar="KEY=VALUE", help="the same, without --set"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(DEMO_CONFIG, [*args.bare_overrides, *args.overrides])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    images = Path(config.input.uri)
    if not images.exists():
        write_demo_images(images)
        print(f"wrote sample images to {images}/")
    for task in ("depth", "segmentation"):
        model_dir = getattr(config.models, task)
        if model_dir and not Path(model_dir).exists():
            build_seeded_checkpoint(model_dir, task)
            print(f"built a seeded {task} checkpoint in {model_dir}/")

    from pipeline.run import run_annotation

    summary = run_annotation(config)
    print()
    print(format_summary(summary))
    print(f"  depth maps:        {config.output.uri}/depth/")
    print(f"  segmentation maps: {config.output.uri}/segmentation/")
    if summary.quality_report_uri:
        print(f"  open the report:   {Path(summary.quality_report_uri).resolve().as_uri()}")
    if config.pseudo_labels.enabled and config.models.segmentation:
        from dpt_model.labels import PseudoLabelDataset
        from jobs.export import export_coco

        options = config.storage_options()
        kept = len(PseudoLabelDataset(config.output.uri, options, with_images=False))
        parts = export_coco(config.output.uri, storage_options=options)
        print(
            f"  pseudo-labels:     {kept} images kept (label_coverage >= "
            f"{config.pseudo_labels.min_coverage}); COCO export: {parts[0] if parts else '-'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
