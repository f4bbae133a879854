"""Shared fixtures: seeded tiny checkpoints, a small Ray cluster, image corpora."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from dpt_model.seeded import build_seeded_checkpoint
from jobs.sample_images import encoded, synthetic_photo
from tests.s3_server import TEST_CREDENTIALS

# CI runs the property tests with a fixed seed so a landing never depends on
# luck; local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# (height, width) of the parity images: landscape, portrait, square, wide, tiny.
PARITY_SIZES = ((240, 320), (400, 300), (256, 256), (120, 500), (37, 53))
# The seeded ViT checkpoints' output size: depth maps are stored at it by default
# (output.depth_resolution: model).
SEEDED_VIT_DEPTH_HW = (384, 384)


def _checked_depth_range(model_dir: Path, backbone: str) -> Path:
    """A parity test on a model whose outputs are all ~0 proves nothing; refuse one."""
    from dpt_model import DepthPredictor, resize_for_model

    predictor = DepthPredictor(str(model_dir))
    image = np.asarray(synthetic_photo(96, 64, seed=0))
    [prediction] = predictor.predict([resize_for_model(image, predictor.spec)], [(64, 96)])
    depth_range = prediction.depth_max - prediction.depth_min
    assert depth_range > 1e-3, f"seeded {backbone} depth model is degenerate: {depth_range}"
    return model_dir


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {
        "depth-vit": build_seeded_checkpoint(root / "depth-vit", "depth", "vit"),
        "segmentation-vit": build_seeded_checkpoint(
            root / "segmentation-vit", "segmentation", "vit"
        ),
        "depth-hybrid": build_seeded_checkpoint(root / "depth-hybrid", "depth", "hybrid"),
        "depth-dinov2": build_seeded_checkpoint(root / "depth-dinov2", "depth", "dinov2"),
        "depth-anything": build_seeded_checkpoint(
            root / "depth-anything", "depth", "depth_anything"
        ),
    }
    for name in ("depth-vit", "depth-hybrid", "depth-dinov2", "depth-anything"):
        _checked_depth_range(paths[name], name)
    return paths


@pytest.fixture(scope="session")
def parity_images() -> list[np.ndarray]:
    """RGB arrays of different sizes and aspect ratios, decoded from real JPEGs."""
    from pipeline.decode import decode_image

    return [
        decode_image(encoded(synthetic_photo(w, h, seed=i), "JPEG"), 10**8, 10**5).rgb
        for i, (h, w) in enumerate(PARITY_SIZES)
    ]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for the whole session."""
    from tests.s3_server import moto_s3_server

    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU local Ray instance shared by every test that needs Ray."""
    import ray

    # Workers inherit the environment at start: give them the S3 test credentials.
    for key, value in TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Tests that need these start Ray or an S3 server: "slow" (pytest -m "not slow").
_SLOW_FIXTURES = frozenset({"ray_cluster", "s3_endpoint"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The quick loop (-m "not slow") starts no Python process: a CLI, a job or Ray
# takes seconds to start. Quick tools (uname, envsubst) are fine. A test that
# starts Python and is not marked slow fails, saying so, rather than slowing it.
# In a virtual environment its bin folder holds Python programs only (ray, aws).
_VENV_BIN = Path(sys.executable).parent if sys.prefix != sys.base_prefix else None
_quick_test: list[str] = []  # node id of the unmarked test now running


def _refuse_python_in_quick_tests(event: str, args: tuple) -> None:
    if not _quick_test or event != "subprocess.Popen":
        return
    executable, argv = args[0], args[1]
    program = executable or (argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0])
    program = Path(os.fsdecode(program))
    resolved = Path(shutil.which(program) or program).absolute()
    in_venv = _VENV_BIN is not None and resolved.parent == _VENV_BIN
    if in_venv or resolved.name.startswith("python"):
        raise AssertionError(f"{_quick_test[0]} starts {program.name}: mark it @pytest.mark.slow")


sys.addaudithook(_refuse_python_in_quick_tests)


@pytest.fixture(autouse=True)
def _python_processes_only_in_slow_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("slow") is None:
        _quick_test.append(request.node.nodeid)
    yield
    _quick_test.clear()
