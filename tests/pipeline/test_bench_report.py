import argparse
import re

import pytest

from pipeline.bench import report


@pytest.mark.slow
def test_the_report_benchmark_measures_the_report_and_the_resume_check(tmp_path):
    args = argparse.Namespace(rows=3000, work_dir=tmp_path, rows_per_part=1000)
    results = report.main(args)
    for measurement in report.MEASUREMENTS:
        assert results[measurement]["peak_rss_mib"] > 0
    assert results["report"]["seconds"] > 0 and results["done_images"]["seconds"] > 0
    page = (tmp_path / "output-3000-1000" / "report" / "index.html").read_text()
    assert re.search(r'data-count="images">3,000<', page)
