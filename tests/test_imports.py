"""What each module pulls in when a fresh process imports it.

Ray workers that run the CPU stages import only their stage's module; torch there
costs about a second and 130 MB per worker process (every CPU of every node), and
``dpt_model`` must stay usable without Ray.
"""

import subprocess
import sys

import pytest

CPU_STAGE_MODULES = [
    "pipeline.read",
    "pipeline.shards",
    "pipeline.decode",
    "pipeline.encode",
    "pipeline.write",
    "pipeline.output.done",  # read tasks unpickle DoneImages, for read_shard's done check
    "pipeline.progress",
]


def _imported_after(module: str, watched: list[str]) -> list[str]:
    probe = (
        f"import sys, {module}; "
        f"print(' '.join(name for name in {watched!r} if name in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return result.stdout.split()


@pytest.mark.slow
@pytest.mark.parametrize("module", CPU_STAGE_MODULES)
def test_cpu_stage_modules_do_not_import_torch(module):
    assert _imported_after(module, ["torch", "transformers"]) == []


@pytest.mark.slow
def test_dpt_model_does_not_import_ray_and_its_package_loads_torch_only_on_use():
    assert _imported_after("dpt_model.predictor", ["ray"]) == []
    assert _imported_after("dpt_model", ["torch"]) == []
    assert _imported_after("dpt_model.predictor", ["torch"]) == ["torch"]  # the probe works
