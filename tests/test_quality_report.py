"""A job's quality report, looked at in a real headless browser.

The job runs in pseudo-label mode over photos and hostile files; the page it
writes is loaded from a file URL in Chromium, which must load every image, and
show the counts the Parquet holds. A screenshot is saved as a test artifact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpt_model.seeded import SEEDED_LABELS
from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from pipeline.schema import reason_group
from tests.browser import INSTALL_HINT, Chromium, find_chromium
from tests.corpus import hostile_files, write_files
from tests.test_pseudo_labels_job import pseudo_label_config

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DPT_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
# In CI the browser is installed before the tests; there a missing one is a failure.
BROWSER_REQUIRED = os.environ.get("DPT_REQUIRE_BROWSER") == "1"

# Read in the page: every <img> loaded or not, and the numbers shown.
_PAGE_FACTS = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute("src"),
                                           loaded: i.complete && i.naturalWidth > 0})),
  counts: Object.fromEntries([...document.querySelectorAll("[data-count]")]
                             .map(e => [e.dataset.count, e.textContent])),
  errors: [...document.querySelectorAll(".error-group summary")].map(e => e.textContent),
  legend: [...document.querySelectorAll(".legend-item")].map(e => e.textContent),
  runs: [...document.querySelectorAll("#runs td:first-child")].map(e => e.textContent),
})"""


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        if BROWSER_REQUIRED:
            pytest.fail(f"DPT_REQUIRE_BROWSER=1 but no Chromium was found. {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return executable


@pytest.fixture(scope="module")
def finished_output(ray_cluster, checkpoints, tmp_path_factory):
    from pipeline.run import run_annotation

    corpus = tmp_path_factory.mktemp("report-corpus")
    photos = {
        f"photo {i}.jpg": encoded(synthetic_photo(160 + 48 * i, 120 + 16 * i, seed=i), "JPEG")
        for i in range(6)
    }
    photos["café.png"] = encoded(synthetic_photo(90, 140, seed=9), "PNG")
    hostile = hostile_files()
    write_files(corpus, {**photos, **{name: hostile[name] for name in list(hostile)[:3]}})
    output = tmp_path_factory.mktemp("report-output")
    config = pseudo_label_config(
        corpus, output, checkpoints, "pseudo_labels.min_coverage=0.45", "report.samples=5"
    )
    summary = run_annotation(config)
    return output, summary


def page_facts(chromium: str, page: Path, screenshot: str) -> dict:
    import json

    with Chromium(chromium) as browser:
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )
        browser.load(page.resolve().as_uri())
        facts = json.loads(browser.evaluate(_PAGE_FACTS))
        shot = browser.screenshot(ARTIFACTS / screenshot)
        facts["failed_requests"] = [
            event["params"]
            for event in browser.events
            if event["method"] == "Network.loadingFailed"
        ]
    print(f"screenshot: {shot}")
    return facts


@pytest.mark.slow
def test_every_run_writes_a_report_whose_page_matches_the_parquet(chromium, finished_output):
    output, summary = finished_output
    page = output / "report" / "index.html"
    assert summary.quality_report_uri == str(page)

    facts = page_facts(chromium, page, "quality-report.png")

    assert facts["failed_requests"] == []
    assert len(facts["images"]) == 15  # 5 samples × input, depth, segmentation
    assert all(image["loaded"] for image in facts["images"]), facts["images"]
    rows = read_predictions(str(output)).to_pylist()
    ok = [row for row in rows if row["status"] == "ok"]
    expected = {
        "images": len(rows),
        "ok": len(ok),
        "error": len(rows) - len(ok),
        "kept": sum(row["kept"] is True for row in ok),
        "weak": sum(row["kept"] is False for row in ok),
    }
    assert expected["error"] == 3 and expected["weak"] > 0 and expected["kept"] > 0
    assert {key: int(value.replace(",", "")) for key, value in facts["counts"].items()} == expected
    shown_errors = sorted(text.split(" ", 1)[1] for text in facts["errors"])
    assert shown_errors == sorted(
        {reason_group(row["error"]) for row in rows if row["status"] == "error"}
    )
    # Classes are named from the checkpoint's id2label.
    assert any(name in " ".join(facts["legend"]) for name in SEEDED_LABELS)
    assert facts["runs"] == [summary.run_id]  # the run that wrote the page heads its table
    assert (ARTIFACTS / "quality-report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_report_command_rebuilds_the_page_with_another_sample(chromium, finished_output):
    output, _ = finished_output
    result = subprocess.run(
        [sys.executable, "-m", "jobs.report", str(output), "--samples", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    facts = page_facts(chromium, output / "report" / "index.html", "quality-report-rebuilt.png")
    assert len(facts["images"]) == 6 and all(image["loaded"] for image in facts["images"])
    assert len(list((output / "report" / "thumbs").iterdir())) == 6
    assert any(name in " ".join(facts["legend"]) for name in SEEDED_LABELS)
    # The whole report stays small: a page and a few dozen thumbnails.
    report_bytes = sum(path.stat().st_size for path in (output / "report").rglob("*"))
    assert report_bytes < 1_000_000


@pytest.mark.slow
def test_a_depth_only_run_over_the_output_still_names_earlier_classes(
    finished_output, checkpoints, tmp_path
):
    from pipeline.run import run_annotation

    output, _ = finished_output
    write_files(tmp_path, {"new.jpg": encoded(synthetic_photo(100, 80, seed=40), "JPEG")})
    config = load_config(
        None,
        [
            f"input.uri={tmp_path}",
            f"output.uri={output}",
            f"models.depth={checkpoints['depth-vit']}",
            "models.segmentation=null",
        ],
    )
    run_annotation(config)
    classes = (output / "report" / "index.html").read_text().split('id="classes"')[1]
    assert any(f"{name} (" in classes for name in SEEDED_LABELS)
