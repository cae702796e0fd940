"""The `s2naip report` page: its HTML (counts, rejects, pair statistics, figures) and the sampled
tiles' inputs for its grids. The figures are drawn by `transforms.quality.report_figures`; the
command (pipelines/report.py) reads the run and writes the files.
"""
from __future__ import annotations

import html

from transforms import pairs, records
from transforms.pairs import PairConfig
from transforms.quality.report_figures import REVIEW_DB, SampleTile
from transforms.tiles import TileId

# The page shows each figure once; overview.png (the first four on one canvas) is written beside
# them, as one image to share, and linked from the page.
FIGURES = {
    "overview.png": "Overview: the four charts below on one image",
    "rejects_by_reason.png": "Rejects by reason",
    "psnr_histogram.png": "PSNR of the chosen pairs",
    "valid_timesteps.png": "Timesteps per tile",
    "score_distribution.png": "Scores of chosen vs other candidates",
    "sample_pairs.png": "Sample pairs (Figure 1 style)",
    "sample_timesteps.png": "Kept timesteps (Figure 3 style)",
}



def load_samples(rows: list[dict], input_root: str | None, nir_root: str | None, bands: str) -> list[SampleTile]:
    """The sampled pairs with their input (original NAIP, time series) where it can be read; says on
    stdout when it cannot (the grids then show only what the output holds)."""
    samples, unreadable = [], []
    config = PairConfig(input_root=input_root, nir_root=nir_root, bands=bands) if input_root else None
    for row in rows:
        sample = SampleTile(row)
        if config is not None:
            try:
                inputs = pairs.load_tile(TileId.parse(row["tile_id"]), config)
                sample.original_hr, sample.series = inputs.hr, inputs.series
            except Exception as e:  # the input moved or is partial: the grid shows what the output has
                unreadable.append(f"{row['tile_id']}: {getattr(e, 'detail', None) or e}")
        samples.append(sample)
    if rows and config is None:
        print("note: run.json names no input: the sample grids show the output only (pass --input)")
    elif unreadable:
        print(f"note: {len(unreadable)} of {len(rows)} sampled tiles unreadable in the input {input_root} "
              f"(e.g. {unreadable[0]}): the grids show the output only for them (pass --input)")
    return samples


def _fmt(value, digits=1, unit=""):
    return "–" if value is None else f"{value:,.{digits}f}{unit}"


def figure_caption(name: str, summary: dict) -> str:
    if name == "score_distribution.png":
        scores = summary["scores"]
        return f"{FIGURES[name]}: {scores['label']}, histogram range 0 to {scores['range'][1]:g}"
    return FIGURES[name]


def report_html(info: dict, counts: dict, summary: dict, sample_ids: list[str], figures: list[str]) -> str:
    e = html.escape
    tiles_total = counts.get("tiles", 0)
    rejects = counts.get("rejects_by_reason", {})
    psnr = summary["psnr"]
    valid = summary["valid_timesteps"]
    options = info.get("options", {})

    def pct(n):
        return f"{100 * n / tiles_total:.1f}%" if tiles_total else "–"

    reason_rows = "".join(
        f"<tr><td><code>{e(reason)}</code></td><td class=n>{n:,}</td><td class=n>{pct(n)}</td>"
        f"<td>{e(records.REJECT_REASONS.get(reason, ''))}</td></tr>"
        for reason, n in sorted(rejects.items(), key=lambda kv: -kv[1]))
    selection_rows = "".join(f"<tr><td><code>{e(k)}</code></td><td class=n>{v:,}</td></tr>"
                             for k, v in summary["selection"].items())
    option_text = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if k in
                            ("selection", "alpha", "top_k", "lr_timesteps", "downsample", "bands", "split"))
    multi = counts.get("lr_timesteps")  # run.json of a --lr-timesteps N > 1 build
    multi_row = "" if not multi else (
        f"<tr><td>timesteps per pair (--lr-timesteps {multi['requested']})</td><td class=n>"
        f"{multi['pairs_with_all']:,} pairs with all {multi['requested']}, "
        f"{e(', '.join(f'{v:,} with {k}' for k, v in multi['pairs_by_count'].items() if int(k) != multi['requested']) or 'none with fewer')}; "
        f"{multi['rejected_too_few']:,} tiles rejected with fewer acceptable</td></tr>")
    figure_html = "".join(
        f'<figure><img src="{e(name)}" alt="{e(FIGURES[name])}"><figcaption>{e(figure_caption(name, summary))} '
        f'(<a href="{e(name)}">{e(name)}</a>)</figcaption></figure>' for name in figures if name != "overview.png")
    overview_link = (f'<p class="meta">{e(FIGURES["overview.png"])}: <a href="overview.png">overview.png</a></p>'
                     if "overview.png" in figures else "")
    scores = summary["scores"]
    score_text = (f"{e(scores['label'])}; max {_fmt(scores['max'], 2)}"
                  + (f", {scores['above_range']:,} beyond the histogram's {scores['range'][1]:g}"
                     if scores["above_range"] else ""))
    below = psnr.get(f"below_{REVIEW_DB:g}_db", 0)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>S2-NAIP build report</title>
<style>
body {{ font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #212529;
  max-width: 1200px; margin: 24px auto; padding: 0 20px; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 17px; margin-top: 32px; }}
.meta {{ color: #6c757d; font-size: 13px; word-break: break-all; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0; }}
.card {{ border: 1px solid #dee2e6; border-radius: 8px; padding: 10px 16px; min-width: 140px; }}
.card b {{ display: block; font-size: 22px; }} .card span {{ color: #6c757d; font-size: 12px; }}
table {{ border-collapse: collapse; margin: 8px 0; }} td, th {{ padding: 4px 12px; border-bottom: 1px solid #e9ecef;
  text-align: left; vertical-align: top; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 18px 0; }} figure img {{ max-width: 100%; border: 1px solid #e9ecef; }}
figcaption {{ color: #6c757d; font-size: 12px; }} code {{ font-size: 12.5px; }}
</style></head><body>
<h1>S2-NAIP build report</h1>
<div class="meta">output {e(str(info.get("output", "")))} · input {e(str(info.get("input", "")))} ·
pipeline {e(str(info.get("pipeline_version", "")))} · {e(option_text)} · built {e(str(info.get("end_time", "")))}</div>
<div class="cards">
<div class="card"><b>{tiles_total:,}</b><span>input tiles</span></div>
<div class="card"><b>{counts.get("pairs", 0):,}</b><span>pairs ({pct(counts.get("pairs", 0))})</span></div>
<div class="card"><b>{counts.get("rejects", 0):,}</b><span>rejects ({pct(counts.get("rejects", 0))})</span></div>
<div class="card"><b>{_fmt(psnr["median"], 1, " dB")}</b><span>median selection PSNR</span></div>
<div class="card"><b>{below:,}</b><span>chosen timesteps below {REVIEW_DB:g} dB (selection PSNR)</span></div>
<div class="card"><b>{_fmt(valid["mean"], 1)}</b><span>valid timesteps per tile (mean)</span></div>
</div>
<h2>Rejects</h2>
<table><tr><th>reason</th><th>tiles</th><th>share</th><th>meaning</th></tr>{reason_rows or
    '<tr><td colspan=4>no rejects</td></tr>'}</table>
<h2>Pairs</h2>
<table>
<tr><td>selection PSNR of the chosen timestep (dB, vs the downsampled original NAIP)</td><td class=n>mean {_fmt(psnr["mean"], 2)}, min {_fmt(psnr["min"], 2)},
5% {_fmt(psnr["p05"])}, median {_fmt(psnr["median"])}, 95% {_fmt(psnr["p95"])}, max {_fmt(psnr["max"], 2)}</td></tr>
<tr><td>valid timesteps per tile</td><td class=n>mean {_fmt(valid["mean"])}, min {valid["min"]}, max {valid["max"]}</td></tr>
<tr><td>score (lower is better)</td><td>{score_text}</td></tr>
{multi_row}</table>
<table><tr><th>selection</th><th>pairs</th></tr>{selection_rows}</table>
<h2>Figures</h2>
{figure_html}
{overview_link}
<h2>Sampled tiles</h2>
<p class="meta">{e(", ".join(sample_ids)) or "none"}</p>
</body></html>
"""
