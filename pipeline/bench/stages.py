"""Per-stage CPU cost of the job's own functions, and map encodings compared.

The job's stage functions are called in one process, in order, on a sample of
the benchmark's images, and each stage's process CPU time (all threads) is
summed: CPU-ms per image and per megapixel. The same functions run inside Ray
in the job, so this says what each stage costs, not how Ray overlaps them.

Decode and preprocess are also timed with ``decode.jpeg_draft`` off, for
comparison. The encoding comparison takes the sample's depth maps and times every way the
job can store one (resolution × PNG compression level) next to one it cannot
yet (float16 ``.npy`` compressed with zstd, lossless), for ms and bytes per image.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_IMAGES = 25
PNG_LEVELS = (0, 1, 6)
STAGES = ("list", "read", "decode", "preprocess", "forward", "postprocess", "encode", "write")


def measure_stages(
    images: str,
    model: str,
    work: str,
    device: str,
    dtype: str,
    batch_size: int,
    cpu_threads: int,
    segmentation_model: str | None = None,
    sample: int = SAMPLE_IMAGES,
    **_: Any,
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from dpt_model import DepthPredictor
    from dpt_model.processing import resize_for_model
    from dpt_model.quantize import quantize_depth
    from dpt_model.tensor_processing import to_model_tensor, upsample_depth
    from jobs.config import InputConfig
    from pipeline.decode import decode_image
    from pipeline.encode import encode_depth_png
    from pipeline.listing import list_input
    from pipeline.read import read_batch

    torch.set_num_threads(cpu_threads)
    predictor = DepthPredictor(model, device=device, dtype=dtype, resolution="model")
    spec = predictor.spec
    cpu_ms: dict[str, float] = defaultdict(float)
    without_draft_ms: dict[str, float] = defaultdict(float)
    with torch.inference_mode():  # warm-up, as the job's first batch pays it once
        shape = (batch_size, 3, spec.height_px, spec.width_px)
        warm_up = torch.zeros(shape, device=predictor.device, dtype=predictor.dtype)
        predictor.model(pixel_values=warm_up)

    with _cpu_time(cpu_ms, "list"):
        rows = list(list_input(InputConfig(uri=images, format="files"), {}).rows)
    cpu_ms["list"] *= min(sample, len(rows)) / len(rows)  # charge the sample its share
    rows = rows[:sample]
    output = Path(work) / "stages-output"
    output.mkdir(parents=True, exist_ok=True)
    megapixels = 0.0
    depth_maps: list[tuple[torch.Tensor, tuple[int, int]]] = []
    model_inputs: list[tuple[np.ndarray, tuple[int, int]]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        with _cpu_time(cpu_ms, "read"):
            batch = read_batch({"source_uri": np.array([r["source_uri"] for r in chunk])}, {})
        inputs, sizes = [], []
        for data in batch["image_bytes"]:
            with _cpu_time(cpu_ms, "decode"):
                rgb, original_hw = decode_image(data, 10**9, 10**5, reduce_for=[spec])
            with _cpu_time(cpu_ms, "preprocess"):
                inputs.append(resize_for_model(rgb, spec, original_hw))
            # The same two steps with decode.jpeg_draft off, for comparison only.
            with _cpu_time(without_draft_ms, "decode"):
                full = decode_image(data, 10**9, 10**5).rgb
            with _cpu_time(without_draft_ms, "preprocess"):
                resize_for_model(full, spec)
            sizes.append(original_hw)
            megapixels += original_hw[0] * original_hw[1] / 1e6
        with _cpu_time(cpu_ms, "preprocess"):
            pixels = torch.from_numpy(np.stack(inputs)).to(predictor.device)
            ready = to_model_tensor(pixels, spec, predictor.dtype)
        with _cpu_time(cpu_ms, "forward"), torch.inference_mode():
            predicted = predictor.model(pixel_values=ready).predicted_depth.float()
            predicted.sum().item()  # waits for the device
        with _cpu_time(cpu_ms, "postprocess"):
            quantized = [quantize_depth(depth) for depth in predicted]
        depth_maps += list(zip(predicted.cpu(), sizes, strict=True))
        model_inputs += list(zip(inputs, sizes, strict=True))
        for (levels, _, _), row in zip(quantized, chunk, strict=True):
            with _cpu_time(cpu_ms, "encode"):
                png = encode_depth_png(levels, compress_level=1)
            with _cpu_time(cpu_ms, "write"):
                (output / f"{Path(row['source_key']).name}.png").write_bytes(png)
    with _cpu_time(cpu_ms, "write"):
        pq.write_table(pa.Table.from_pylist(rows), output / "rows.parquet")

    count = len(rows)
    stages = {
        stage: {
            "cpu_ms_per_image": cpu_ms[stage] / count,
            "cpu_ms_per_mp": cpu_ms[stage] / megapixels,
        }
        for stage in STAGES
    }
    return {
        "sample_images": count,
        "megapixels_per_image": megapixels / count,
        "stages": stages,
        "without_jpeg_draft": {
            stage: {"cpu_ms_per_image": without_draft_ms[stage] / count}
            for stage in ("decode", "preprocess")
        },
        "encodings": _compare_encodings(depth_maps, upsample_depth, quantize_depth),
        "segmentation": (
            _segmentation_costs(segmentation_model, model_inputs, device, dtype, batch_size)
            if segmentation_model
            else None
        ),
    }


def _segmentation_costs(
    model: str,
    model_inputs: list[tuple[np.ndarray, tuple[int, int]]],
    device: str,
    dtype: str,
    batch_size: int,
) -> dict[str, Any]:
    """CPU cost per image of a segmentation map after the forward pass.

    postprocess: logits upsampled to the image's size, argmax and confidence
    (on a GPU actor this runs on the device); encode: the 8-bit palette PNG at
    the image's size, which runs on CPUs whatever the device.
    """
    import torch

    from dpt_model import SegmentationPredictor
    from dpt_model.tensor_processing import to_model_tensor, upsample_segmentation
    from pipeline.encode import encode_segmentation_png

    predictor = SegmentationPredictor(model, device=device, dtype=dtype)
    cpu_ms: dict[str, float] = defaultdict(float)
    total_bytes = 0
    for start in range(0, len(model_inputs), batch_size):
        chunk = model_inputs[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([pixels for pixels, _ in chunk])).to(predictor.device)
        with torch.inference_mode():
            logits = predictor.model(
                pixel_values=to_model_tensor(pixels, predictor.spec, predictor.dtype)
            ).logits
        for row, (_, original_hw) in enumerate(chunk):
            with _cpu_time(cpu_ms, "postprocess"):
                class_ids = upsample_segmentation(logits[row], original_hw).class_ids
                class_ids = class_ids.to(torch.uint8).cpu().numpy()
            with _cpu_time(cpu_ms, "encode"):
                total_bytes += len(encode_segmentation_png(class_ids, compress_level=1))
    count = len(model_inputs)
    return {
        "classes": len(predictor.id2label),
        "postprocess_cpu_ms_per_image": cpu_ms["postprocess"] / count,
        "encode_cpu_ms_per_image": cpu_ms["encode"] / count,
        "bytes_per_image": total_bytes / count,
    }


def _compare_encodings(
    depth_maps: list[tuple[Any, tuple[int, int]]], upsample_depth, quantize_depth
) -> list[dict[str, Any]]:
    import pyarrow as pa

    from pipeline.encode import encode_depth_npz, encode_depth_png

    results = []
    for resolution in ("model", "original"):
        cpu_ms: dict[str, float] = defaultdict(float)
        sizes: dict[str, int] = defaultdict(int)
        for depth, original_hw in depth_maps:
            with _cpu_time(cpu_ms, "resize"):
                if resolution == "original":
                    depth = upsample_depth(depth, original_hw)
            with _cpu_time(cpu_ms, "quantize"):
                levels = quantize_depth(depth)[0]
            for level in PNG_LEVELS:
                with _cpu_time(cpu_ms, f"png16-level{level}"):
                    sizes[f"png16-level{level}"] += len(encode_depth_png(levels, level))
            with _cpu_time(cpu_ms, "npz-float16"):  # output.depth_format: npz_float16
                sizes["npz-float16"] += len(encode_depth_npz(depth.numpy().astype(np.float16)))
            with _cpu_time(cpu_ms, "npy-float16-zstd"):
                buffer = io.BytesIO()
                np.save(buffer, depth.numpy().astype(np.float16))
                compressed = pa.compress(buffer.getvalue(), codec="zstd", asbytes=True)
                sizes["npy-float16-zstd"] += len(compressed)
        count = len(depth_maps)
        for encoding, total_bytes in sizes.items():
            # A PNG needs the quantised levels; the float16 array does not.
            extra = cpu_ms["quantize"] if encoding.startswith("png") else 0.0
            results.append(
                {
                    "resolution": resolution,
                    "encoding": encoding,
                    "resize_ms_per_image": cpu_ms["resize"] / count,
                    "encode_ms_per_image": (cpu_ms[encoding] + extra) / count,
                    "bytes_per_image": total_bytes / count,
                }
            )
    return results


@contextmanager
def _cpu_time(totals: dict[str, float], stage: str) -> Iterator[None]:
    started = time.process_time()
    try:
        yield
    finally:
        totals[stage] += (time.process_time() - started) * 1000
