"""The quality report as one HTML page: inline CSS and SVG, thumbnails beside it.

Pure: ``render_page`` turns what the builder gathered into a string. Every
value from the data (file names, error text, class names) is HTML-escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pipeline.encode import IGNORE_CLASS_ID
from pipeline.report.stats import Histogram, OutputStats
from pipeline.report.thumbnails import colour_hex

MAX_CLASSES_SHOWN = 40
_HISTOGRAM_TITLES = {
    "seg_confidence_mean": ("Segmentation confidence", "mean max-softmax per image"),
    "label_coverage": ("Label coverage", "share of pixels labelled per image (pseudo-labels)"),
    "entropy_mean": ("Entropy", "mean normalised entropy per image (0 certain, 1 uniform)"),
}


@dataclass
class Sample:
    """One image of the grid: its row's facts and the thumbnails made for it."""

    row: dict[str, Any]
    # Paths relative to the page (``thumbs/…``), or None where no thumbnail was made.
    input_thumbnail: str | None = None
    depth_thumbnail: str | None = None
    segmentation_thumbnail: str | None = None
    classes: list[int] = field(default_factory=list)  # class ids in its segmentation map
    problems: list[str] = field(default_factory=list)  # why a thumbnail is missing


@dataclass
class ReportPage:
    output_uri: str
    generated_at: str
    stats: OutputStats
    class_names: dict[int, str]
    runs: list[dict[str, Any]]  # newest first: finished run records' summaries
    samples: list[Sample]


def render_page(page: ReportPage) -> str:
    sections = [
        _counts_section(page.stats),
        _runs_section(page.runs),
        _errors_section(page.stats),
        _classes_section(page.stats, page.class_names),
        _histograms_section(page.stats),
        _samples_section(page.samples, page.class_names),
    ]
    title = f"Quality report: {page.output_uri}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_text(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            f"<h1>{_text(title)}</h1>",
            f'<p class="muted">Built {_text(page.generated_at)} from the committed '
            "predictions: one row per image, the latest result of each. Rebuild with "
            f"<code>python -m jobs.report {_text(page.output_uri)}</code>.</p>",
            *[section for section in sections if section],
            "</body></html>",
        ]
    )


def _counts_section(stats: OutputStats) -> str:
    counts = [("images", "images", stats.images), ("ok", "ok", stats.ok)]
    counts.append(("error", "errors", stats.error))
    if stats.kept or stats.weak:
        counts += [("kept", "kept as pseudo-labels", stats.kept), ("weak", "weak", stats.weak)]
    cells = "".join(
        f'<div class="count"><span class="number" data-count="{key}">{value:,}</span>'
        f"<span>{_text(label)}</span></div>"
        for key, label, value in counts
    )
    kinds = ", ".join(f"{_text(kind)} ({count:,})" for kind, count in stats.depth_kinds.items())
    depth_line = f'<p class="muted">Depth maps: {kinds}.</p>' if kinds else ""
    return (
        f'<section id="counts"><h2>Counts</h2><div class="counts">{cells}</div>'
        f"{depth_line}</section>"
    )


def _run_counts(run: dict[str, Any]) -> str:
    """A finished run's counts as table cells; a run that did not finish has none
    (its rows are in the view, its counts in no record)."""
    if run.get("outcome", "finished") != "finished":
        return '<td colspan="5" class="muted">no counts: the run wrote no finish record</td>'
    # .get throughout: records written by earlier versions lack some fields.
    return (
        f"<td>{run.get('images_ok', 0):,}</td><td>{run.get('images_error', 0):,}</td>"
        f"<td>{run.get('images_skipped_done', 0):,}</td><td>{run.get('elapsed_s', 0):,.1f}</td>"
        f"<td>{run.get('images_per_s', 0):,.2f}</td>"
    )


def _runs_section(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    header = (
        "<tr><th>run</th><th>outcome</th><th>ended (UTC)</th><th>ok</th><th>errors</th>"
        "<th>already done</th><th>seconds</th><th>images/s</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{_text(run.get('run_id', '?'))}</td>"
        f"<td>{_text(run.get('outcome', 'finished'))}</td>"
        f"<td>{_text(run.get('finished_at', ''))}</td>{_run_counts(run)}</tr>"
        for run in runs
    )
    return f'<section id="runs"><h2>Runs</h2><table>{header}{rows}</table></section>'


def _errors_section(stats: OutputStats) -> str:
    if not stats.error_groups:
        return '<section id="errors"><h2>Errors</h2><p>None.</p></section>'
    items = []
    for group in stats.error_groups:
        examples = "".join(
            f"<li><code>{_text(uri)}</code>: {_text(reason)}</li>" for uri, reason in group.examples
        )
        items.append(
            f'<details class="error-group"><summary><span class="number">{group.count:,}</span> '
            f"{_text(group.reason)}</summary><ul>{examples}</ul></details>"
        )
    more = (
        f'<p class="muted">{stats.more_error_groups:,} further kinds of error not listed.</p>'
        if stats.more_error_groups
        else ""
    )
    return f'<section id="errors"><h2>Errors by reason</h2>{"".join(items)}{more}</section>'


def _classes_section(stats: OutputStats, class_names: dict[int, str]) -> str:
    if not stats.class_images:
        return ""
    most = stats.class_images[0][1] or 1
    rows = []
    for class_id, images in stats.class_images[:MAX_CLASSES_SHOWN]:
        width = 100 * images / most
        rows.append(
            f'<div class="bar-row"><span class="swatch" style="background:{colour_hex(class_id)}">'
            f'</span><span class="label">{_text(_class_name(class_id, class_names))}</span>'
            f'<span class="bar" style="width:{width:.1f}%"></span>'
            f'<span class="number">{images:,}</span></div>'
        )
    hidden = len(stats.class_images) - MAX_CLASSES_SHOWN
    more = f'<p class="muted">{hidden:,} rarer classes not shown.</p>' if hidden > 0 else ""
    return (
        '<section id="classes"><h2>Classes</h2><p class="muted">Images in which each class '
        f'appears, across the output.</p><div class="bars">{"".join(rows)}</div>{more}</section>'
    )


def _histograms_section(stats: OutputStats) -> str:
    figures = [
        _histogram_svg(name, stats.histograms[name])
        for name in _HISTOGRAM_TITLES
        if name in stats.histograms
    ]
    if not figures:
        return ""
    return (
        '<section id="histograms"><h2>Distributions</h2>'
        f'<div class="figures">{"".join(figures)}</div></section>'
    )


def _histogram_svg(name: str, histogram: Histogram) -> str:
    title, subtitle = _HISTOGRAM_TITLES[name]
    width, height, bottom = 300, 120, 18
    most = max(histogram.counts) or 1
    bar_width = width / len(histogram.counts)
    bars = []
    for index, count in enumerate(histogram.counts):
        bar_height = (height - bottom) * count / most
        low, high = histogram.edges[index], histogram.edges[index + 1]
        bars.append(
            f'<rect x="{index * bar_width:.1f}" y="{height - bottom - bar_height:.1f}" '
            f'width="{bar_width - 1:.1f}" height="{bar_height:.1f}">'
            f"<title>{low:.2f}–{high:.2f}: {count:,} images</title></rect>"
        )
    axis = (
        f'<text x="0" y="{height - 4}">0</text>'
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">0.5</text>'
        f'<text x="{width}" y="{height - 4}" text-anchor="end">1</text>'
    )
    missing = f", {histogram.missing:,} without a value" if histogram.missing else ""
    return (
        f'<figure class="histogram" id="histogram-{name}"><figcaption><b>{_text(title)}</b>: '
        f"{_text(subtitle)}; tallest bar {most:,} images{missing}</figcaption>"
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f"{''.join(bars)}{axis}</svg></figure>"
    )


def _samples_section(samples: list[Sample], class_names: dict[int, str]) -> str:
    if not samples:
        return ""
    cards = "".join(_sample_card(sample) for sample in samples)
    shown = sorted({class_id for sample in samples for class_id in sample.classes})
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{colour_hex(class_id)}">'
        f"</span>{_text(_class_name(class_id, class_names))}</span>"
        for class_id in shown
        if class_id != IGNORE_CLASS_ID
    )
    if IGNORE_CLASS_ID in shown:
        legend += (
            '<span class="legend-item"><span class="swatch ignored"></span>'
            "ignored (under pseudo_labels.min_confidence), image dimmed</span>"
        )
    return (
        f'<section id="samples"><h2>Sampled images ({len(samples)})</h2>'
        '<p class="muted">Input, depth (turbo colour map: red near, blue far, '
        "each image scaled to its own range) and segmentation over the input.</p>"
        f'<div class="legend">{legend}</div><div class="grid">{cards}</div></section>'
    )


def _sample_card(sample: Sample) -> str:
    row = sample.row
    # The file and its folder: enough to tell same-named files apart.
    name = "/".join(row["source_uri"].rstrip("/").split("/")[-2:])
    pictures = "".join(
        f'<img src="{quote(path)}" alt="{label} of {_text(name)}" title="{label}">'
        for label, path in (
            ("input", sample.input_thumbnail),
            ("depth", sample.depth_thumbnail),
            ("segmentation", sample.segmentation_thumbnail),
        )
        if path
    )
    facts = [f"{row['width']}×{row['height']}"]
    if row.get("seg_confidence_mean") is not None:
        facts.append(f"confidence {row['seg_confidence_mean']:.2f}")
    if row.get("label_coverage") is not None:
        facts.append(f"coverage {row['label_coverage']:.2f}")
    if row.get("kept") is False:
        facts.append('<span class="weak">weak</span>')
    problems = "".join(f'<p class="problem">{_text(problem)}</p>' for problem in sample.problems)
    return (
        f'<figure class="sample"><div class="pictures">{pictures}</div>'
        f'<figcaption title="{_text(row["source_uri"])}">{_text(name)}<br>'
        f"{' · '.join(facts)}</figcaption>{problems}</figure>"
    )


def _class_name(class_id: int, class_names: dict[int, str]) -> str:
    name = class_names.get(class_id)
    return f"{name} ({class_id})" if name else f"class {class_id}"


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px;word-break:break-all}h2{font-size:16px;margin-top:28px}
.muted{color:#666}code{font-size:12px;word-break:break-all}
.counts{display:flex;gap:16px;flex-wrap:wrap}
.count{border:1px solid #ddd;border-radius:6px;padding:8px 14px;display:flex;flex-direction:column}
.count .number{font-size:22px;font-weight:600}
table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
.error-group summary{cursor:pointer;padding:2px 0}
.error-group .number{font-weight:600;margin-right:6px}
.bars{max-width:720px}.bar-row{display:flex;align-items:center;gap:8px;margin:2px 0}
.bar-row .label{width:220px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{display:inline-block;height:12px;background:#4a78c2;min-width:1px}.bar-row .number{color:#444}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #0003;flex:none}
.swatch.ignored{background:#222}
.figures{display:flex;gap:24px;flex-wrap:wrap}.histogram{margin:0;max-width:320px}
.histogram svg{display:block;margin-top:4px}.histogram rect{fill:#4a78c2}
.histogram text{font-size:10px;fill:#555}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:8px 0}
.legend-item{display:flex;align-items:center;gap:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.sample{margin:0;border:1px solid #eee;border-radius:6px;padding:6px}
.pictures{display:flex;gap:4px}
.pictures img{width:33%;height:150px;object-fit:contain;background:#f4f4f4}
.sample figcaption{font-size:12px;color:#444;word-break:break-all;margin-top:4px}
.weak{color:#b45309;font-weight:600}.problem{color:#b91c1c;font-size:12px;margin:2px 0}
"""
