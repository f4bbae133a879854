"""Throughput: the job against the loop a user would otherwise write, same images and model.

- **naive**: transformers' ``pipeline("depth-estimation")`` called one image at a
  time, each depth map saved as a 16-bit PNG with Pillow's defaults, one Parquet
  file at the end;
- **pipeline**: the real job (``run_annotation``), files in, files out, depth only.

Each runs in a fresh process. Images are generated JPEGs of mixed sizes (0.3 to
8 megapixels); the checkpoint is a seeded tiny DPT written with save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

# (width, height): 0.3, 1.2, 2.1, 5.0 and 8.0 megapixels, photo aspect ratios.
IMAGE_SIZES = ((640, 480), (1280, 960), (1920, 1080), (2592, 1944), (3264, 2448))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=200, help="images to annotate")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench_results/throughput"),
        help="generated images, checkpoint and outputs (images are reused between runs)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="the job's inference batch")


def main(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir.resolve()
    images = _generated_images(work / f"images-{args.images}", args.images)
    model = work / "model-tiny-depth"
    if not model.exists():
        from dpt_model.seeded import build_seeded_checkpoint

        build_seeded_checkpoint(model, "depth", "vit")
    params = {"images": str(images), "model": str(model), "work": str(work)}
    print(f"naive loop over {args.images} images...", file=sys.stderr)
    naive = _run_child("naive", params)
    print(f"pipeline over {args.images} images...", file=sys.stderr)
    job = _run_child("pipeline", {**params, "batch_size": args.batch_size})
    results = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "packages": {name: version(name) for name in ("ray", "torch", "transformers")},
        },
        "parameters": {
            "images": args.images,
            "image_sizes": IMAGE_SIZES,
            "checkpoint": "seeded tiny DPT (ViT, hidden 32, 4 layers, 384×384), depth",
            "batch_size": args.batch_size,
        },
        "naive": naive,
        "pipeline": job,
        "pipeline_over_naive": job["images_per_s"] / naive["images_per_s"],
    }
    print(
        f"\nthroughput, {args.images} images, {os.cpu_count()} CPUs\n"
        f"  naive     {naive['images_per_s']:7.2f} images/s "
        f"(loop {naive['loop_s']:.1f} s, model load {naive['setup_s']:.1f} s)\n"
        f"  pipeline  {job['images_per_s']:7.2f} images/s "
        f"(total {job['elapsed_s']:.1f} s, of it annotating {job['annotate_s']:.1f} s)\n"
        f"  pipeline / naive: {results['pipeline_over_naive']:.2f}×\n"
    )
    return results


def _generated_images(folder: Path, count: int) -> Path:
    from jobs.sample_images import encoded, synthetic_photo

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            path.write_bytes(encoded(synthetic_photo(width, height, seed=index), "JPEG"))
    return folder


def measure_naive(images: str, model: str, work: str) -> dict[str, Any]:
    """What a user writes without this project: one image at a time through transformers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import pipeline

    from dpt_model.quantize import quantize_depth

    started = time.perf_counter()
    estimator = pipeline("depth-estimation", model=model, device="cpu")
    setup_s = time.perf_counter() - started
    output = Path(work) / "naive-output"
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    paths = sorted(Path(images).glob("*.jpg"))
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            depth = estimator(image.convert("RGB"))["predicted_depth"]
        levels, depth_min, depth_max = quantize_depth(depth.squeeze())
        target = output / f"{path.name}.png"
        Image.fromarray(levels).save(target)
        rows.append({"source": str(path), "depth": str(target), "min": depth_min, "max": depth_max})
    pq.write_table(pa.Table.from_pylist(rows), output / "predictions.parquet")
    loop_s = time.perf_counter() - started
    return {
        "images": len(paths),
        "setup_s": setup_s,
        "loop_s": loop_s,
        "images_per_s": len(paths) / loop_s,
        "png_bytes_per_image": sum(p.stat().st_size for p in output.glob("*.png")) / len(paths),
    }


def measure_pipeline(images: str, model: str, work: str, batch_size: int) -> dict[str, Any]:
    """The job itself, with Ray started in this process as a user's first run would."""
    from jobs.config import load_config
    from pipeline.run import run_annotation

    config = load_config(
        None,
        [
            f"input.uri={images}",
            f"output.uri={Path(work) / 'pipeline-output'}",
            f"models.depth={model}",
            f"inference.batch_size={batch_size}",
            "output.overwrite=true",
        ],
    )
    summary = run_annotation(config)
    return {
        "images": summary.images_ok + summary.images_error,
        "errors": summary.images_error,
        "elapsed_s": summary.elapsed_s,
        "annotate_s": summary.timings_s["annotate"],
        # Whole job, Ray start-up included: what a user waits for.
        "images_per_s": summary.images_per_s,
        "stage_timings_s": summary.stage_timings_s,
    }


def _run_child(measurement: str, params: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", __name__, measurement, json.dumps(params), result_path]
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(
                f"{measurement} failed ({child.returncode}):\n{child.stderr[-4000:]}"
            )
        return json.loads(Path(result_path).read_text())


if __name__ == "__main__":
    measurement, params, result_path = sys.argv[1:]
    measure = {"naive": measure_naive, "pipeline": measure_pipeline}[measurement]
    Path(result_path).write_text(json.dumps(measure(**json.loads(params))))
