"""Statistics and figures of a build's output, for `s2naip report`.

The statistics stream: each row group of `pairs/` is read with only its scalar and list columns
(never `hr`/`lr`), folded into fixed-size histograms and counters, and dropped, so memory does not
grow with the number of pairs. The sample grids pick tiles by a seeded hash of their id (the same
tiles whatever the sharding), and only the row groups holding them are read again, with images.

Figures are drawn with matplotlib's object API (no pyplot state, Agg canvas) and returned as PNG bytes:

* `rejects_by_reason`: bar chart of reject reasons;
* `psnr_histogram`: PSNR of the chosen pairs, with the 20 dB line the paper reviews below;
* `valid_timesteps_histogram`: valid (and all) timesteps per tile;
* `score_distribution`: score of the chosen timestep vs the other top-k candidates, labelled and
  ranged per selection mode (`score_scale`);
* `sample_grid` (paper Figure 1 style): original NAIP, histogram-matched NAIP, Sentinel-2, RGB and NIR;
* `timestep_grid` (paper Figure 3 style): the HR next to its kept timesteps, best PSNR first;
* `overview`: the four statistics figures on one canvas (a file to share; the page shows them one by one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
from collections import Counter
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.imagery import MAX_TIMESTEPS
from transforms.io import readers, storage
from transforms.quality.review_page import iter_row_groups

PSNR_BIN_DB = 0.1
PSNR_MAX_DB = 100.0
SCORE_BIN = 0.0025
# What `score` is, and the range its histogram covers, per selection mode (transforms.selection):
# paper and companion are 1 - a mix of SSIMs, in [0, 2]; robust adds an evidence penalty to the
# paper's distance (veils up to 0.8, twin haze and snow up to 2 each, cirrus 0.5, cloud probability
# 1, an underexposed timestep 10), so its scores stay within ~4 except on gated timesteps.
SCORE_SCALES = {
    "paper": ("score = a*(1-SSIM(HR, LR)) + (1-a)*(1-SSIM(HM(HR), LR))", 2.0),
    "companion": ("score = 1 - (a*SSIM(LR, HR) + (1-a)*SSIM(HR, HM(HR))), the companion code's SSIM", 2.0),
    "robust": ("score = a*(1-SSIM(HR, LR)) + (1-a)*(1-SSIM(HM(HR), LR)) + evidence penalty "
               "(veils, darkness, haze, snow, cirrus, cloud probability)", 16.0),
}
UNKNOWN_SCORE_SCALE = ("score (the build's selection mode is unknown: no run.json)", 16.0)
REVIEW_DB = 20.0  # the paper reviewed the test pairs below 20 dB
STAT_COLUMNS = ("tile_id", "psnr", "score", "lr_index", "n_timesteps", "valid_indices", "candidate_indices",
                "candidate_scores", "selection")
SAMPLE_COLUMNS = ("tile_id", "hr", "lr", "hr_shape", "lr_shape", "lr_index", "psnr", "candidate_indices",
                  "candidate_psnr", "selection")

COLORS = {"pair": "#2b8a3e", "reject": "#e8590c", "chosen": "#1971c2", "other": "#adb5bd", "line": "#c92a2a",
          "manual": "#2f9e44", "ink": "#212529", "muted": "#6c757d", "grid": "#e9ecef"}


# ---------------------------------------------------------------------------------------------
# Streaming statistics


def _edges(bin_width: float, maximum: float) -> np.ndarray:
    return np.linspace(0.0, maximum, int(round(maximum / bin_width)) + 1)


def score_scale(mode: str | None) -> tuple[str, float]:
    """(axis label, histogram range maximum) of the scores of a build in selection `mode`."""
    return SCORE_SCALES.get(mode or "", UNKNOWN_SCORE_SCALE)


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; values below/above the range go to the first/last bin (NaN dropped)."""
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return np.bincount(np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2),
                       minlength=len(edges) - 1)


@dataclasses.dataclass
class SampleRef:
    key: bytes  # the seeded hash of the tile id: the sample is the k smallest
    tile_id: str
    path: str
    row_group: int
    row: int


class PairStats:
    """Histograms and counters of the pairs, folded one row group at a time."""

    def __init__(self, samples: int = 6, seed: int = 0, mode: str | None = None):
        self.mode = mode
        self.score_label, self.score_max = score_scale(mode)
        self.psnr_edges = _edges(PSNR_BIN_DB, PSNR_MAX_DB)
        self.score_edges = _edges(SCORE_BIN, self.score_max)
        self.scores_above = 0  # chosen and other candidates' scores beyond score_max (in the last bin)
        self.score_max_seen = -np.inf
        self.psnr_counts = np.zeros(len(self.psnr_edges) - 1, np.int64)
        self.chosen_score_counts = np.zeros(len(self.score_edges) - 1, np.int64)
        self.other_score_counts = np.zeros(len(self.score_edges) - 1, np.int64)
        self.valid_counts = np.zeros(MAX_TIMESTEPS + 1, np.int64)
        self.total_counts = np.zeros(MAX_TIMESTEPS + 1, np.int64)
        self.selection = Counter()
        self.pairs = 0
        self.psnr_sum = 0.0
        self.psnr_min = np.inf
        self.psnr_max = -np.inf
        self.below_review = 0
        self.n_samples, self.seed = samples, seed
        self._heap: list[tuple[bytes, str, str, int, int]] = []  # max-heap on the key (negated bytes)

    def _sample_key(self, tile_id: str) -> bytes:
        return hashlib.sha256(f"{self.seed}\0{tile_id}".encode()).digest()[:12]

    def add(self, table: pa.Table, path: str = "", row_group: int = 0) -> None:
        n = table.num_rows
        if not n:
            return
        self.pairs += n
        psnr = table.column("psnr").to_numpy(zero_copy_only=False).astype(np.float64)
        finite = psnr[np.isfinite(psnr)]
        self.psnr_counts += _histogram(psnr, self.psnr_edges)
        if finite.size:
            self.psnr_sum += float(finite.sum())
            self.psnr_min = min(self.psnr_min, float(finite.min()))
            self.psnr_max = max(self.psnr_max, float(finite.max()))
        self.below_review += int(np.count_nonzero(psnr < REVIEW_DB))
        valid = pc.list_value_length(table.column("valid_indices")).to_numpy(zero_copy_only=False)
        self.valid_counts += np.bincount(np.clip(valid, 0, MAX_TIMESTEPS), minlength=MAX_TIMESTEPS + 1)
        total = table.column("n_timesteps").to_numpy(zero_copy_only=False)
        self.total_counts += np.bincount(np.clip(total, 0, MAX_TIMESTEPS), minlength=MAX_TIMESTEPS + 1)
        chosen_scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        self.chosen_score_counts += _histogram(chosen_scores, self.score_edges)
        self._note_score_range(chosen_scores)
        # every other top-k candidate: flatten the lists, drop the chosen index of each row
        cand = table.column("candidate_indices").combine_chunks()
        scores = pc.list_flatten(table.column("candidate_scores").combine_chunks()).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(cand).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(cand).to_numpy(zero_copy_only=False)
        lr_index = table.column("lr_index").to_numpy(zero_copy_only=False)
        if flat.size:
            others = flat != lr_index[parents]
            other_scores = scores[others].astype(np.float64)
            self.other_score_counts += _histogram(other_scores, self.score_edges)
            self._note_score_range(other_scores)
        self.selection.update(table.column("selection").to_pylist())
        if self.n_samples:
            for row, tile_id in enumerate(table.column("tile_id").to_pylist()):
                key = self._sample_key(tile_id)
                entry = (bytes(255 - b for b in key), tile_id, path, row_group, row)
                if len(self._heap) < self.n_samples:
                    heapq.heappush(self._heap, entry)
                elif entry > self._heap[0]:
                    heapq.heapreplace(self._heap, entry)

    def _note_score_range(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if values.size:
            self.score_max_seen = max(self.score_max_seen, float(values.max()))
            self.scores_above += int(np.count_nonzero(values > self.score_max))

    def samples(self) -> list[SampleRef]:
        """The sampled tiles, in sample order (smallest hash first)."""
        refs = [SampleRef(bytes(255 - b for b in e[0]), e[1], e[2], e[3], e[4]) for e in self._heap]
        return sorted(refs, key=lambda r: r.key)

    # summaries ---------------------------------------------------------------------------------

    def psnr_quantile(self, q: float) -> float | None:
        """The q-quantile of the chosen pairs' PSNR, to the histogram's 0.1 dB."""
        total = int(self.psnr_counts.sum())
        if not total:
            return None
        index = int(np.searchsorted(np.cumsum(self.psnr_counts), q * total, side="left"))
        return round(float(self.psnr_edges[min(index, len(self.psnr_edges) - 2)] + PSNR_BIN_DB / 2), 2)

    def summary(self) -> dict:
        valid_total = int(self.valid_counts.sum())
        mean_valid = float((self.valid_counts * np.arange(len(self.valid_counts))).sum() / valid_total) \
            if valid_total else None
        finite = int(self.psnr_counts.sum())
        return {
            "pairs": self.pairs,
            "selection": dict(sorted(self.selection.items())),
            "psnr": {
                "mean": self.psnr_sum / finite if finite else None,
                "min": self.psnr_min if finite else None,
                "max": self.psnr_max if finite else None,
                "p05": self.psnr_quantile(0.05), "median": self.psnr_quantile(0.5), "p95": self.psnr_quantile(0.95),
                f"below_{REVIEW_DB:g}_db": self.below_review,
            },
            "valid_timesteps": {"mean": mean_valid,
                                "min": _first_nonzero(self.valid_counts), "max": _last_nonzero(self.valid_counts)},
            "scores": {"mode": self.mode, "label": self.score_label, "range": [0.0, self.score_max],
                       "max": self.score_max_seen if np.isfinite(self.score_max_seen) else None,
                       "above_range": self.scores_above},
        }


def _first_nonzero(counts: np.ndarray) -> int | None:
    nz = np.flatnonzero(counts)
    return int(nz[0]) if nz.size else None


def _last_nonzero(counts: np.ndarray) -> int | None:
    nz = np.flatnonzero(counts)
    return int(nz[-1]) if nz.size else None


def collect_stats(run: str, samples: int = 6, seed: int = 0, mode: str | None = None) -> PairStats:
    """One pass over the build's pairs, reading only STAT_COLUMNS, a row group at a time; `mode`
    (the build's selection mode) sets the score histogram's label and range."""
    stats = PairStats(samples, seed, mode)
    for path, group, table in iter_row_groups(run, STAT_COLUMNS):
        stats.add(table, path, group)
    return stats


def count_rejects(run: str) -> Counter:
    """Rejects per reason from `rejects/` (only the `reason` column), when run.json has no counts."""
    counts = Counter()
    try:
        files = readers.match_files(storage.join(run, "rejects"), (".parquet",))
    except FileNotFoundError:
        return counts
    import pyarrow.parquet as pq

    for path in files:
        with storage.open_file(path) as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                counts.update(parquet.read_row_group(group, columns=["reason"]).column("reason").to_pylist())
    return counts


def read_sample_rows(refs: Iterable[SampleRef]) -> dict[str, dict]:
    """The sampled pair rows (with images): only the row groups holding a sample are read."""
    import pyarrow.parquet as pq

    by_group: dict[tuple[str, int], list[SampleRef]] = {}
    for ref in refs:
        by_group.setdefault((ref.path, ref.row_group), []).append(ref)
    rows = {}
    for (path, group), group_refs in by_group.items():
        with storage.open_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=list(SAMPLE_COLUMNS))
        for ref in group_refs:
            row = table.slice(ref.row, 1).to_pylist()[0]
            assert row["tile_id"] == ref.tile_id, (row["tile_id"], ref.tile_id)
            rows[ref.tile_id] = row
        del table
    return rows


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, facecolor="white")
    return fig


def _style(ax, grid_axis: str = "y") -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#ced4da")
    ax.tick_params(colors=COLORS["ink"], labelsize=9)
    ax.grid(axis=grid_axis, color=COLORS["grid"], linewidth=0.8)
    ax.set_axisbelow(True)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return buf.getvalue()


def _title(ax, text: str, sub: str = "") -> None:
    ax.set_title(text, loc="left", fontsize=11.5, fontweight="bold", color=COLORS["ink"], pad=16 if sub else 8)
    if sub:
        ax.text(0, 1.02, sub, transform=ax.transAxes, fontsize=9, color=COLORS["muted"], va="bottom")


def _draw_rejects(ax, rejects: dict[str, int], tiles_total: int) -> None:
    _style(ax, "x")
    items = sorted(rejects.items(), key=lambda kv: (kv[1], kv[0]))
    rejected = sum(rejects.values())
    share = f" ({100 * rejected / tiles_total:.1f}%)" if tiles_total else ""
    _title(ax, "Rejects by reason", f"{rejected:,} of {tiles_total:,} tiles rejected{share}")
    if not items:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes, color=COLORS["muted"])
        ax.set_yticks([])
        return
    names, values = zip(*items)
    bars = ax.barh(range(len(items)), values, color=COLORS["reject"], height=0.65)
    ax.set_yticks(range(len(items)), names, fontsize=9)
    top = max(values)
    for bar, v in zip(bars, values):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{v:,}", va="center",
                fontsize=8.5, color=COLORS["ink"])
    ax.set_xlim(0, top * 1.15)
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("tiles", fontsize=9, color=COLORS["muted"])


def _draw_psnr(ax, stats: PairStats) -> None:
    _style(ax)
    counts, edges = stats.psnr_counts, stats.psnr_edges
    nz = np.flatnonzero(counts)
    median = stats.psnr_quantile(0.5)
    sub = (f"{stats.pairs:,} pairs, median {median:.1f} dB, {stats.below_review:,} below {REVIEW_DB:g} dB"
           if median is not None else "no pairs")
    _title(ax, "PSNR of the chosen pairs", sub)
    if not nz.size:
        return
    lo = max(0.0, np.floor(edges[nz[0]]) - 1)
    hi = min(PSNR_MAX_DB, np.ceil(edges[nz[-1] + 1]) + 1)
    width = max(0.5, round((hi - lo) / 50 * 2) / 2)  # ~50 bars, a multiple of 0.5 dB
    factor = max(1, int(round(width / PSNR_BIN_DB)))
    first = int(np.floor(lo / PSNR_BIN_DB / factor)) * factor
    merged = np.add.reduceat(counts[first:], np.arange(0, len(counts) - first, factor))
    left = edges[first::factor][: len(merged)]
    keep = left < hi
    colors = [COLORS["reject"] if x + width <= REVIEW_DB + 1e-9 else COLORS["chosen"] for x in left[keep]]
    ax.bar(left[keep], merged[keep], width=width * 0.92, align="edge", color=colors)
    ax.set_ylim(0, int(merged[keep].max()) * 1.15 + 1)
    _integer_ticks(ax.yaxis)
    ax.axvline(REVIEW_DB, color=COLORS["line"], linestyle="--", linewidth=1.2)
    ax.text(REVIEW_DB, ax.get_ylim()[1] * 0.97, f" {REVIEW_DB:g} dB", color=COLORS["line"], fontsize=8.5, va="top")
    if median is not None:
        ax.axvline(median, color=COLORS["ink"], linewidth=1)
        ax.text(median, ax.get_ylim()[1] * 0.88, f" median {median:.1f}", fontsize=8.5, va="top")
    ax.set_xlim(min(lo, REVIEW_DB - 1), hi)
    ax.set_xlabel("PSNR (dB) of the chosen timestep vs the downsampled original NAIP (selection's PSNR)",
                  fontsize=9, color=COLORS["muted"])
    ax.set_ylabel("pairs", fontsize=9, color=COLORS["muted"])


def _draw_valid(ax, stats: PairStats) -> None:
    _style(ax)
    valid, total = stats.valid_counts, stats.total_counts
    both = np.flatnonzero(valid + total)
    mean = stats.summary()["valid_timesteps"]["mean"]
    _title(ax, "Timesteps per tile", f"valid (no black border), mean {mean:.1f}" if mean is not None else "no pairs")
    if not both.size:
        return
    lo, hi = int(both[0]), int(both[-1])
    step = max(1, int(np.ceil((hi - lo + 1) / 60)))
    starts = np.arange(lo - lo % step, hi + 1, step)
    v = np.add.reduceat(valid, starts)[: len(starts)]
    t = np.add.reduceat(total, starts)[: len(starts)]
    ax.bar(starts, v, width=step * 0.85, align="edge", color=COLORS["chosen"], label="valid timesteps")
    ax.stairs(t, np.append(starts, starts[-1] + step), color=COLORS["muted"], linewidth=1.4,
              label="all timesteps (incl. black-bordered)")
    ax.set_ylim(0, max(int(v.max()), int(t.max())) * 1.3 + 1)
    _integer_ticks(ax.yaxis)
    ax.legend(frameon=False, fontsize=8.5, loc="upper right", ncols=2)
    ax.set_xlabel("timesteps in the tile's series" + (f" (bins of {step})" if step > 1 else ""), fontsize=9,
                  color=COLORS["muted"])
    ax.set_ylabel("tiles", fontsize=9, color=COLORS["muted"])


def _draw_scores(ax, stats: PairStats) -> None:
    _style(ax)
    chosen, other, edges = stats.chosen_score_counts, stats.other_score_counts, stats.score_edges
    above = f"; {stats.scores_above:,} above {stats.score_max:g}, in the last bar" if stats.scores_above else ""
    mode = f"{stats.mode} selection: " if stats.mode else ""
    _title(ax, "Score of chosen vs other candidates",
           f"{mode}{int(chosen.sum()):,} chosen, {int(other.sum()):,} other top-k candidates; lower is better{above}")
    both = chosen + other
    if not both.sum():
        return
    cum = np.cumsum(both) / both.sum()
    hi_index = min(int(np.searchsorted(cum, 0.995)) + 1, len(both) - 1)  # the last bin holds all above
    lo_index = int(np.flatnonzero(both)[0])
    span = hi_index - lo_index
    factor = max(1, int(np.ceil(span / 60)))
    starts = np.arange(lo_index, hi_index + 1, factor)
    width = SCORE_BIN * factor
    for counts, color, label, alpha in ((other, COLORS["other"], "other candidates", 0.9),
                                        (chosen, COLORS["chosen"], "chosen", 0.75)):
        merged = np.add.reduceat(counts, starts)[: len(starts)]
        density = merged / max(1, counts.sum()) / width
        ax.bar(edges[starts], density, width=width, align="edge", color=color, alpha=alpha, label=label,
               linewidth=0)
    ax.legend(frameon=False, fontsize=8.5)
    ax.set_xlim(edges[starts[0]], edges[min(starts[-1], len(edges) - 1)] + width)
    tail = int(both[starts[-1] + factor:].sum())  # the last bar also holds the 0.5% above the view
    if tail:
        ax.text(0.99, 0.62, f"last bar also holds the {tail:,} scores above {edges[starts[-1]] + width:.2f}"
                f"\n(highest {stats.score_max_seen:.2f})", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color=COLORS["muted"])
    ax.set_xlabel(stats.score_label, fontsize=9, color=COLORS["muted"])
    ax.set_ylabel("density", fontsize=9, color=COLORS["muted"])


def rejects_by_reason(rejects: dict[str, int], tiles_total: int) -> bytes:
    fig = _figure(7.0, 0.5 + 0.38 * max(3, len(rejects)))
    _draw_rejects(fig.add_subplot(), rejects, tiles_total)
    return _png(fig)


def psnr_histogram(stats: PairStats) -> bytes:
    fig = _figure(7.0, 3.6)
    _draw_psnr(fig.add_subplot(), stats)
    return _png(fig)


def valid_timesteps_histogram(stats: PairStats) -> bytes:
    fig = _figure(7.0, 3.6)
    _draw_valid(fig.add_subplot(), stats)
    return _png(fig)


def score_distribution(stats: PairStats) -> bytes:
    fig = _figure(7.0, 3.6)
    _draw_scores(fig.add_subplot(), stats)
    return _png(fig)


def overview(stats: PairStats, rejects: dict[str, int], tiles_total: int) -> bytes:
    fig = _figure(13.0, 8.2)
    axes = fig.subplots(2, 2, gridspec_kw={"hspace": 0.55, "wspace": 0.32})
    _draw_rejects(axes[0, 0], rejects, tiles_total)
    _draw_psnr(axes[0, 1], stats)
    _draw_valid(axes[1, 0], stats)
    _draw_scores(axes[1, 1], stats)
    return _png(fig)


def _image_axis(ax, image: np.ndarray | None, frame: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.set_facecolor("#f1f3f5")
        ax.text(0.5, 0.5, "input\nunavailable", ha="center", va="center", fontsize=7, color=COLORS["muted"],
                transform=ax.transAxes)
    elif image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame:
            spine.set_color(frame)
            spine.set_linewidth(3)


@dataclasses.dataclass
class SampleTile:
    """What the grids show of one sampled tile: its pair row and, if readable, its input."""

    row: dict
    original_hr: np.ndarray | None = None  # [128, 128, C] as in the input
    series: np.ndarray | None = None  # [T, 32, 32, C]

    @property
    def hr(self) -> np.ndarray:
        return np.frombuffer(self.row["hr"], np.uint8).reshape(self.row["hr_shape"])

    @property
    def lr(self) -> np.ndarray:
        """The chosen timestep [32, 32, C] (the first of a --lr-timesteps N pair's, the HR's match)."""
        lr = np.frombuffer(self.row["lr"], np.uint8).reshape(self.row["lr_shape"])
        return lr[0] if lr.ndim == 4 else lr


def sample_grid(samples: list[SampleTile]) -> bytes:
    """Paper Figure 1 style: per sampled tile, original NAIP, histogram-matched NAIP and the chosen
    Sentinel-2 timestep, in RGB and (RGBN builds) NIR."""
    rgbn = bool(samples) and samples[0].hr.shape[-1] >= 4
    columns = [("NAIP\noriginal", "orig", slice(0, 3)), ("NAIP\nhistogram-matched", "hm", slice(0, 3)),
               ("Sentinel-2\nchosen timestep", "lr", slice(0, 3))]
    if rgbn:
        columns += [None,  # a gap between the RGB and the NIR group
                    ("NAIP NIR\noriginal", "orig", slice(3, 4)), ("NAIP NIR\nhistogram-matched", "hm", slice(3, 4)),
                    ("Sentinel-2 B08\nchosen timestep", "lr", slice(3, 4))]
    n = max(1, len(samples))
    ratios = [0.12 if c is None else 1.0 for c in columns]
    height = 1.8 * n + 0.9
    fig = _figure(1.75 * sum(ratios) + 0.7, height)
    axes = fig.subplots(n, len(columns), squeeze=False,
                        gridspec_kw={"wspace": 0.06, "hspace": 0.12, "width_ratios": ratios,
                                     "top": 1 - 0.85 / height, "bottom": 0.02})
    for r in range(n):
        sample = samples[r] if r < len(samples) else None
        images = {} if sample is None else {"orig": sample.original_hr, "hm": sample.hr, "lr": sample.lr}
        for c, column in enumerate(columns):
            ax = axes[r, c]
            if column is None:
                ax.set_axis_off()
                continue
            title, which, bands = column
            image = images.get(which)
            _image_axis(ax, None if image is None else image[..., bands])
            if r == 0:
                ax.set_title(title, fontsize=8.5, color=COLORS["ink"], fontweight="bold")
        if sample is not None:
            row = sample.row
            axes[r, 0].set_ylabel(f"{row['tile_id'].split('/')[-1]}\nt={row['lr_index']}, {row['psnr']:.1f} dB",
                                  fontsize=8, color=COLORS["muted"])
    fig.suptitle("Sample pairs (paper Figure 1 style)", x=0.02, y=1 - 0.12 / height, ha="left", va="top",
                 fontsize=12, fontweight="bold", color=COLORS["ink"])
    return _png(fig)


def timestep_grid(samples: list[SampleTile], max_timesteps: int = 16) -> bytes:
    """Paper Figure 3 style: per tile, its NAIP next to the kept (top-k) timesteps, best PSNR first,
    each with its PSNR; the chosen one framed (blue; green when chosen by a reviewer)."""
    shown = [s for s in samples if s.series is not None and s.original_hr is not None]
    k = max([min(len(s.row["candidate_indices"]), max_timesteps) for s in shown] or [1])
    n = max(1, len(shown))
    height = 1.35 * n + 0.7
    fig = _figure(1.05 * (k + 1) + 0.4, height)
    axes = fig.subplots(n, k + 1, squeeze=False, gridspec_kw={"wspace": 0.08, "hspace": 0.42,
                                                              "top": 1 - 0.7 / height, "bottom": 0.02})
    for r, sample in enumerate(shown):
        row = sample.row
        _image_axis(axes[r, 0], sample.original_hr[..., :3])
        axes[r, 0].set_title("NAIP", fontsize=8, color=COLORS["ink"], fontweight="bold")
        axes[r, 0].set_ylabel(row["tile_id"].split("/")[-1], fontsize=7.5, color=COLORS["muted"])
        order = np.argsort(-np.asarray(row["candidate_psnr"]), kind="stable")[:k]
        frame_color = COLORS["manual"] if row["selection"] == "manual" else COLORS["chosen"]
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= len(order):
                ax.set_axis_off()
                continue
            t = int(row["candidate_indices"][order[c]])
            chosen = t == row["lr_index"]
            _image_axis(ax, sample.series[t][..., :3], frame_color if chosen else None)
            ax.set_title(f"t={t}  {row['candidate_psnr'][order[c]]:.1f}", fontsize=7,
                         color=frame_color if chosen else COLORS["muted"], fontweight="bold" if chosen else None)
    if not shown:
        _image_axis(axes[0, 0], None)
        for ax in axes[0, 1:]:
            ax.set_axis_off()
    fig.suptitle("Kept timesteps by PSNR (dB), chosen framed (paper Figure 3 style)", x=0.01, y=1 - 0.1 / height,
                 ha="left", va="top", fontsize=12, fontweight="bold", color=COLORS["ink"])
    return _png(fig)
