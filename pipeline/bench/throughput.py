"""Throughput: the job against the loop a user would otherwise write and against the model alone.

On the same images and the same seeded checkpoint, each in a fresh process:

- **naive**: transformers' ``pipeline("depth-estimation")`` called one image at a
  time, each depth map saved as a 16-bit PNG with Pillow's defaults, one Parquet
  file at the end;
- **model-only**: the forward pass alone on ready tensors at the job's batch
  size, dtype and threads: the ceiling;
- **pipeline**: the real job (``run_annotation``), files in, files out, depth
  only, with its default output settings; optionally again with extra
  ``--set`` overrides (``--variant``) such as full-size maps;
- **stages**: CPU-ms per image and per megapixel of each stage, called in one
  process on a sample, and map encodings compared (see ``bench/stages.py``).

Images are generated JPEGs of mixed sizes (0.3 to 8 megapixels); with
``--shards N`` the job reads them packed into N webdataset tars instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipeline.bench.child import run_in_child

# (width, height): 0.3, 1.2, 2.1, 5.0 and 8.0 megapixels, photo aspect ratios.
IMAGE_SIZES = ((640, 480), (1280, 960), (1920, 1080), (2592, 1944), (3264, 2448))
MEASUREMENTS = ("naive", "model_only", "stages", "pipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=200, help="images to annotate")
    parser.add_argument(
        "--model-size",
        choices=("tiny", "base", "large"),
        default="tiny",
        help="seeded ViT DPT: tiny (hidden 32, 4 layers), base (DPTConfig defaults, "
        "110 M parameters) or large (dpt-large shapes, 340 M)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="the job's inference batch")
    parser.add_argument(
        "--shards",
        type=int,
        default=0,
        help="the job (pipeline and variants) reads the images packed into this many "
        "webdataset tars (0: image files)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=os.cpu_count(),
        help="CPU inference: torch threads for naive, model-only and the job "
        "(default: %(default)s, this machine's CPU count)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=MEASUREMENTS,
        default=list(MEASUREMENTS),
        help="run only these measurements",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run the job with these config overrides, e.g. "
        "output.depth_resolution=original (repeatable)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench_results/throughput"),
        help="generated images, checkpoints and outputs (reused between runs)",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    work = args.work_dir.resolve()
    images = _generated_images(work / f"images-{args.images}", args.images)
    job_input = (
        _packed_in_shards(images, work / f"shards-{args.images}-{args.shards}", args.shards)
        if args.shards
        else images
    )
    model = work / f"model-{args.model_size}-depth"
    if not (model / "config.json").exists():
        from dpt_model.seeded import build_seeded_checkpoint

        build_seeded_checkpoint(model, "depth", "vit", size=args.model_size)
    # Segmentation costs in the stage breakdown: ADE20k's 150 classes.
    segmentation_model = work / "model-tiny-segmentation-150"
    if "stages" in args.only and not (segmentation_model / "config.json").exists():
        from dpt_model.seeded import build_seeded_checkpoint

        labels = [f"class-{index}" for index in range(150)]
        build_seeded_checkpoint(segmentation_model, "segmentation", "vit", labels=labels)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    params = {
        "images": str(images),
        "job_input": str(job_input),
        "model": str(model),
        "work": str(work),
        "device": device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "cpu_threads": args.cpu_threads,
        "segmentation_model": str(segmentation_model),
    }
    results: dict[str, Any] = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(device),
        "parameters": {
            **{
                key: value
                for key, value in params.items()
                if key not in ("images", "job_input", "work")
            },
            "images": args.images,
            "shards": args.shards,
            "image_sizes": IMAGE_SIZES,
            "model_size": args.model_size,
        },
    }
    for measurement in args.only:
        print(f"{measurement} over {args.images} images...", file=sys.stderr)
        results[measurement] = _run_child(measurement, params)
    for index, variant in enumerate(args.variant):
        # Commas inside brackets belong to a list value: inference.segmentation_scales=[1,1.5]
        overrides = [item for item in re.split(r",(?![^\[]*\])", variant) if item]
        print(f"pipeline with {overrides}...", file=sys.stderr)
        result = _run_child("pipeline", {**params, "overrides": overrides, "run": index + 1})
        results.setdefault("pipeline_variants", []).append({"overrides": overrides, **result})
    results["ratios"] = _ratios(results)
    print(_report(results))
    return results


def _machine(device: str) -> dict[str, Any]:
    import torch

    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in ("ray", "torch", "transformers", "pillow")},
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ratios = {}
    job, naive, ceiling = (results.get(name) for name in ("pipeline", "naive", "model_only"))
    if job and naive:
        ratios["pipeline_over_naive"] = job["images_per_s"] / naive["images_per_s"]
    if job and ceiling:
        ratios["pipeline_over_model_only"] = job["images_per_s"] / ceiling["images_per_s"]
        ratios["pipeline_steady_over_model_only"] = (
            job["steady_images_per_s"] / ceiling["images_per_s"]
        )
    for variant in results.get("pipeline_variants", []):
        if naive:
            name = "_".join(variant["overrides"]) + "_over_naive"
            ratios[name] = variant["images_per_s"] / naive["images_per_s"]
    return ratios


def _report(results: dict[str, Any]) -> str:
    parameters = results["parameters"]
    lines = [
        f"\nthroughput, {parameters['images']} images, {parameters['model_size']} checkpoint, "
        f"{parameters['device']} {parameters['dtype']}, batch {parameters['batch_size']}, "
        f"{results['machine']['cpu_count']} CPUs"
    ]
    if "naive" in results:
        naive = results["naive"]
        lines.append(
            f"  naive       {naive['images_per_s']:8.2f} images/s (loop {naive['loop_s']:.1f} s)"
        )
    if "model_only" in results:
        lines.append(f"  model-only  {results['model_only']['images_per_s']:8.2f} images/s")
    for name, job in [("pipeline", results.get("pipeline"))] + [
        (",".join(v["overrides"]), v) for v in results.get("pipeline_variants", [])
    ]:
        if job:
            lines.append(
                f"  {name:<11} {job['images_per_s']:8.2f} images/s end to end "
                f"({job['elapsed_s']:.1f} s; first map after {job['time_to_first_map_s']:.1f} s, "
                f"then {job['steady_images_per_s']:.2f} images/s)"
            )
    lines += [f"  {name}: {ratio:.2f}×" for name, ratio in results["ratios"].items()]
    if "stages" in results:
        lines.append("  stage        CPU-ms/image  CPU-ms/MP")
        for stage, cost in results["stages"]["stages"].items():
            lines.append(
                f"  {stage:<12} {cost['cpu_ms_per_image']:12.1f} {cost['cpu_ms_per_mp']:10.1f}"
            )
    return "\n".join(lines) + "\n"


def _generated_images(folder: Path, count: int) -> Path:
    from jobs.sample_images import encoded, synthetic_photo

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            path.write_bytes(encoded(synthetic_photo(width, height, seed=index), "JPEG"))
    return folder


def _packed_in_shards(images: Path, folder: Path, shards: int) -> Path:
    """The images of ``images`` as ``shards`` webdataset tars of about as many each."""
    import tarfile

    paths = sorted(images.glob("*.jpg"))
    if not shards or shards > len(paths):
        raise ValueError(f"--shards must be from 1 to the number of images ({len(paths)})")
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        target = folder / f"{shard:05d}.tar"
        if not target.exists():
            partial = target.with_suffix(".tar.partial")
            with tarfile.open(partial, "w") as archive:
                for path in paths[shard::shards]:
                    archive.add(path, arcname=path.name)
            partial.rename(target)
    return folder


def measure_naive(
    images: str, model: str, work: str, device: str, cpu_threads: int, **_: Any
) -> dict[str, Any]:
    """What a user writes without this project: one image at a time through transformers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import pipeline

    from dpt_model.quantize import quantize_depth

    torch.set_num_threads(cpu_threads)
    started = time.perf_counter()
    estimator = pipeline("depth-estimation", model=model, device=device)
    setup_s = time.perf_counter() - started
    output = Path(work) / "naive-output"
    shutil.rmtree(output, ignore_errors=True)  # bytes per image counts this run's files only
    output.mkdir(parents=True)
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
        "bytes_written_per_image": sum(p.stat().st_size for p in output.iterdir()) / len(paths),
    }


def measure_model_only(
    images: str,
    model: str,
    device: str,
    dtype: str,
    batch_size: int,
    cpu_threads: int,
    **_: Any,
) -> dict[str, Any]:
    """The forward pass alone, on ready tensors already on the device: the ceiling."""
    import torch

    from dpt_model import DepthPredictor
    from dpt_model.tensor_processing import to_model_tensor

    torch.set_num_threads(cpu_threads)
    predictor = DepthPredictor(model, device=device, dtype=dtype)
    spec = predictor.spec
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(
        0,
        256,
        (batch_size, spec.height_px, spec.width_px, 3),
        dtype=torch.uint8,
        generator=generator,
    ).to(predictor.device)
    ready = to_model_tensor(pixels, spec, predictor.dtype)
    count = len(list(Path(images).glob("*.jpg")))
    passes = math.ceil(count / batch_size)

    def forward() -> None:
        predictor.model(pixel_values=ready).predicted_depth.float().sum().item()

    with torch.inference_mode():
        for _ in range(2):  # warm-up: allocator, kernels selected, caches
            forward()
        started = time.perf_counter()
        for _ in range(passes):
            forward()
        seconds = time.perf_counter() - started
    return {
        "images": passes * batch_size,
        "seconds": seconds,
        "images_per_s": passes * batch_size / seconds,
    }


def measure_stages(**params: Any) -> dict[str, Any]:
    from pipeline.bench.stages import measure_stages as measure

    return measure(**params)


def measure_pipeline(
    job_input: str,
    model: str,
    work: str,
    device: str,
    dtype: str,
    batch_size: int,
    cpu_threads: int,
    overrides: list[str] = (),
    run: int = 0,
    **_: Any,
) -> dict[str, Any]:
    """The job itself, with Ray started in this process as a user's first run would."""
    import ray

    from jobs.config import load_config
    from pipeline.run import run_annotation

    output = pipeline_output(Path(work), run)
    config = load_config(
        None,
        [
            f"input.uri={job_input}",
            f"output.uri={output}",
            f"models.depth={model}",
            f"inference.batch_size={batch_size}",
            f"inference.device={device}",
            f"inference.dtype={dtype}",
            f"inference.cpu_threads={cpu_threads}",
            f"resources.gpus_per_actor={1 if device == 'cuda' else 0}",
            "output.overwrite=true",
            *overrides,
        ],
    )
    started_wall, started = time.time(), time.perf_counter()
    ray.init()
    ray_init_s = time.perf_counter() - started
    summary = run_annotation(config)
    elapsed_s = time.perf_counter() - started
    annotated = summary.images_ok + summary.images_error
    map_times = _map_file_times(output)
    written = [path for path in output.rglob("*") if path.is_file() and "_runs" not in path.parts]
    if not map_times:
        raise RuntimeError(f"the job wrote no map file under {output}: {summary.error_reasons}")
    first, last = map_times[0] - started_wall, map_times[-1] - started_wall
    return {
        "images": annotated,
        "errors": summary.images_error,
        # Whole job, Ray start-up included: what a user waits for.
        "elapsed_s": elapsed_s,
        "images_per_s": annotated / elapsed_s,
        "ray_init_s": ray_init_s,
        "time_to_first_map_s": first,
        # Between the first and the last map file: the rate a long job runs at.
        "steady_images_per_s": (len(map_times) - 1) / (last - first) if last > first else 0.0,
        "after_last_map_s": elapsed_s - last,
        "timings_s": summary.timings_s,
        "stage_timings_s": summary.stage_timings_s,
        "bytes_written_per_image": sum(path.stat().st_size for path in written) / annotated,
    }


def pipeline_output(work: Path, run: int) -> Path:
    """Where pipeline run ``run`` writes: the plain job (0) and each variant apart."""
    return work / ("pipeline-output" if not run else f"pipeline-output-{run}")


def _map_file_times(output: Path) -> list[float]:
    """Modification times of one map file per image: depth maps, or segmentation maps
    where the job wrote no depth (either may be PNG or NPZ)."""
    for folder in (output / "depth", output / "segmentation"):
        if folder.is_dir():
            return sorted(path.stat().st_mtime for path in folder.rglob("*") if path.is_file())
    return []


def _run_child(measurement: str, params: dict[str, Any]) -> dict[str, Any]:
    return run_in_child(__name__, measurement, params)


if __name__ == "__main__":
    measurement, params, result_path = sys.argv[1:]
    measure = {
        "naive": measure_naive,
        "model_only": measure_model_only,
        "stages": measure_stages,
        "pipeline": measure_pipeline,
    }[measurement]
    Path(result_path).write_text(json.dumps(measure(**json.loads(params))))
