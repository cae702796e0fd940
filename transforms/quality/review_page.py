"""Quality review of a build: rank its pairs by a fidelity metric and write a static review page.

* `pair_metrics` / `prediction_metrics`: PSNR or SSIM (RGB or RGBN) of a batch of pairs, from the
  pairs as stored (the histogram-matched HR, downsampled as the build did, against the chosen LR),
  or of super-resolved predictions against the HR.
* `Ranking`: the worst pairs by a metric, kept while the output is streamed one row group at a
  time (a bounded heap for `worst`, the rows below `threshold` otherwise).
* `review_tile` / `write_page`: per selected tile, the original HR (RGB, NIR), every valid timestep
  with its PSNR and score (as the automatic mode computes them) as PNG sprites, and a static page
  (`review_assets/`: index.html, review.js, review.css, plus a generated data.js) with keyboard
  navigation that exports `corrections.json` for `s2naip build --corrections`.

The page needs no server: every reference is relative, so it works from `file://` and from a bucket.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import heapq
import importlib.resources
import io
import json
import math
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from transforms import records, tiles
from transforms.corrections import timestep_metrics
from transforms.evidence import Evidence
from transforms.imagery import encode_png
from transforms.io import readers, storage
from transforms.selection import DATA_RANGE, ROBUST_WEIGHTS, SelectionConfig, downsample, ssim, to_uint8

METRICS = ("psnr_rgb", "psnr_rgbn", "ssim_rgb", "ssim_rgbn", "confidence")
METRIC_LABELS = {"psnr_rgb": "PSNR RGB", "psnr_rgbn": "PSNR RGBN", "ssim_rgb": "SSIM RGB", "ssim_rgbn": "SSIM RGBN",
                 "confidence": "selection confidence"}
# metrics stored in the pair rows themselves (not computed from images)
STORED_METRICS = ("confidence",)
ASSETS = ("index.html", "review.js", "review.css")
# Columns of a pair row the review keeps for a selected tile (no images).
REVIEW_COLUMNS = ("tile_id", "lr_index", "lr_indices", "n_timesteps", "valid_indices", "candidate_indices", "candidate_psnr",
                  "candidate_scores", "psnr", "score", "selection", "hr_shape", "lr_shape")
PREDICTION_SUFFIXES = (".png", ".npy")
MAX_PREDICTION_BYTES = 16 * 1024 * 1024
PREDICTION_READERS = 8  # threads reading a row group's predictions (one small file per tile)


# ---------------------------------------------------------------------------------------------
# Reading a build's output, a row group at a time


def pair_files(run: str) -> list[str]:
    """The Parquet files of a build's `pairs/` folder (`run` is the build's --output)."""
    return readers.match_files(storage.join(run, "pairs"), (".parquet",))


def iter_row_groups(run: str, columns: Iterable[str]) -> Iterator[tuple[str, int, pa.Table]]:
    """(file, row group, table of `columns`) for every row group of the build's pairs: only the
    named columns are read, one row group (~450 pairs) at a time."""
    columns = list(columns)
    for path in pair_files(run):
        with storage.open_file(path) as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                yield path, group, parquet.read_row_group(group, columns=columns)


def read_run_json(run: str) -> dict:
    """The build's run.json ({} when absent, e.g. a run that did not finish)."""
    try:
        return json.loads(storage.read_bytes(storage.join(run, "run.json"), 64 * 1024 * 1024))
    except FileNotFoundError:
        return {}


def run_selection_config(run_info: dict) -> SelectionConfig:
    """The automatic selection the build ran (from run.json's options; the defaults otherwise)."""
    options = run_info.get("options", {})
    mode = options.get("selection", SelectionConfig().mode)
    try:
        return SelectionConfig(mode=mode, alpha=float(options.get("alpha", 0.7)), top_k=int(options.get("top_k", 16)),
                               downsample=options.get("downsample"),
                               border_px=int(options.get("border_px", 2)),
                               max_border_black=int(options.get("max_border_black", 1)))
    except ValueError:  # a mode this version does not know: score with the default
        return SelectionConfig(alpha=float(options.get("alpha", 0.7)), top_k=int(options.get("top_k", 16)))


# ---------------------------------------------------------------------------------------------
# Metrics


def _bands(metric: str, channels: int) -> int:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric.endswith("rgbn"):
        if channels < 4:
            raise ValueError(f"{metric} needs 4 bands (R, G, B, NIR); these images have {channels}")
        return 4
    return 3


def metric_values(images: np.ndarray, references: np.ndarray, metric: str) -> np.ndarray:
    """PSNR (dB, data range 255; inf for identical images) or SSIM (scikit-image's, mean over
    bands) of each of `images` [N, H, W, C] against `references` [N, H, W, C], over the metric's
    bands."""
    bands = _bands(metric, min(images.shape[-1], references.shape[-1]))
    x = images[..., :bands].astype(np.float64)
    y = references[..., :bands].astype(np.float64)
    if metric.startswith("psnr"):
        mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
        with np.errstate(divide="ignore"):
            return 10.0 * np.log10(DATA_RANGE**2 / mse)
    return ssim(x, y)


def pair_metrics(hr: np.ndarray, lr: np.ndarray, metric: str, downsample_method: str = "bicubic_aa") -> np.ndarray:
    """Fidelity of stored pairs: each HR [N, 128, 128, C] downsampled to the LR size (as the build
    downsampled, rounded to uint8) against its LR [N, 32, 32, C]."""
    hr_down = np.stack([to_uint8(downsample(one, lr.shape[1], downsample_method)) for one in hr])
    return metric_values(hr_down, lr, metric)


def decode_prediction(data: bytes, name: str) -> np.ndarray:
    """A super-resolved tile -> uint8 [128, 128, C]: a PNG (RGB, RGBA read as RGB+NIR, or L), or a
    .npy array HWC or CHW, uint8 or float (floats within [0, 1] are scaled by 255)."""
    if name.endswith(".npy"):
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            if np.nanmax(array) <= 1.0:
                array = array * 255.0
            array = to_uint8(np.nan_to_num(array))
    else:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[:2] != (128, 128):
        raise ValueError(f"{name}: expected a 128x128 uint8 image, got {array.dtype} {array.shape}")
    return array


def prediction_path(predictions: str, tile_id: str, suffix: str) -> str:
    """`<predictions>/<naip_id>/<x>_<y><suffix>`."""
    tile = tiles.TileId.parse(tile_id)
    return storage.join(predictions, tile.naip_id, tile.xy + suffix)


def read_prediction(predictions: str, tile_id: str) -> np.ndarray | None:
    """The tile's prediction (.png first, then .npy), or None when there is none."""
    for suffix in PREDICTION_SUFFIXES:
        path = prediction_path(predictions, tile_id, suffix)
        try:
            data = storage.read_bytes(path, MAX_PREDICTION_BYTES)
        except FileNotFoundError:
            continue
        return decode_prediction(data, path)
    return None


# ---------------------------------------------------------------------------------------------
# Ranking


@dataclasses.dataclass(order=True)
class Ranked:
    value: float
    tile_id: str
    row: dict = dataclasses.field(compare=False)


class Ranking:
    """The worst pairs by a metric (lower is worse), fed row by row: with `worst`, a heap of at most
    `worst` entries; with `threshold`, only the rows below it are kept."""

    def __init__(self, threshold: float | None = None, worst: int | None = None):
        if threshold is None and worst is None:
            raise ValueError("give --threshold and/or --worst")
        if worst is not None and worst < 1:
            raise ValueError(f"--worst must be >= 1, got {worst}")
        self.threshold, self.worst = threshold, worst
        self._kept: list[tuple[float, str, Ranked]] = []  # a max-heap on value via negation
        self.seen = 0
        self.below_threshold = 0

    def add(self, value: float, tile_id: str, row: dict) -> None:
        self.seen += 1
        key = value if math.isfinite(value) else math.inf  # identical images: the best there is
        if self.threshold is not None and not key < self.threshold:
            return
        self.below_threshold += 1
        entry = (-key, _neg_key(tile_id), Ranked(key, tile_id, row))
        if self.worst is None or len(self._kept) < self.worst:
            heapq.heappush(self._kept, entry)
        elif entry > self._kept[0]:
            heapq.heapreplace(self._kept, entry)

    def result(self) -> list[Ranked]:
        """The kept pairs, worst first (ties by tile id)."""
        return sorted(entry[2] for entry in self._kept)


def _neg_key(tile_id: str) -> tuple:
    """Orders the heap so that, among equal values, the later tile id is dropped first."""
    return tuple(-ord(c) for c in tile_id)


def rank_pairs(run: str, metric: str, ranking: Ranking, predictions: str | None = None,
               downsample_method: str = "bicubic_aa") -> dict:
    """Streams the build's pairs into `ranking`; returns counts (pairs, with/without prediction,
    without a stored metric). A stored metric (`confidence`, the selection's own certainty) is
    read from its column, no image decoded; pairs where it is null (manual choices) are counted in
    `no_metric` and not ranked."""
    counts = {"pairs": 0, "missing_predictions": 0, "no_metric": 0}
    if metric in STORED_METRICS:
        if predictions:
            raise ValueError(f"{metric} is the selection's, not a prediction's: rank predictions by an image metric")
        for path in pair_files(run):
            with storage.open_file(path) as f:
                if metric not in pq.ParquetFile(f).schema_arrow.names:
                    raise ValueError(f"{path} has no {metric} column (built before it existed): rebuild, "
                                     "or rank by an image metric")
        for _, _, table in iter_row_groups(run, [*REVIEW_COLUMNS, metric]):
            for row in table.to_pylist():
                counts["pairs"] += 1
                if row[metric] is None:
                    counts["no_metric"] += 1
                    continue
                ranking.add(float(row[metric]), row["tile_id"], {k: row[k] for k in REVIEW_COLUMNS})
        return counts
    columns = list(dict.fromkeys([*REVIEW_COLUMNS, "hr"] + ([] if predictions else ["lr"])))
    for _, _, table in iter_row_groups(run, columns):
        rows = table.to_pylist()
        if not rows:  # an empty shard
            continue
        counts["pairs"] += len(rows)
        hr = np.stack([np.frombuffer(r["hr"], np.uint8).reshape(r["hr_shape"]) for r in rows])
        if predictions:
            keep, preds = [], []
            with concurrent.futures.ThreadPoolExecutor(PREDICTION_READERS) as pool:
                found = list(pool.map(lambda r: read_prediction(predictions, r["tile_id"]), rows))
            for i, pred in enumerate(found):
                if pred is None:
                    counts["missing_predictions"] += 1
                    continue
                keep.append(i)
                preds.append(pred)
            if not keep:
                continue
            values = metric_values(np.stack(preds), hr[keep], metric)
            rows = [rows[i] for i in keep]
        else:
            # the first (best) timestep, the one the HR is matched to (--lr-timesteps N writes N)
            lr = np.stack([records.lr_timesteps(r)[0] for r in rows])
            values = pair_metrics(hr, lr, metric, downsample_method)
        for row, value in zip(rows, values):
            ranking.add(float(value), row["tile_id"], {k: row[k] for k in REVIEW_COLUMNS})
    return counts


# ---------------------------------------------------------------------------------------------
# The page


@dataclasses.dataclass
class ReviewTile:
    """One tile of the page: its data.js entry and its image files (relative name -> PNG bytes)."""

    entry: dict
    files: dict[str, bytes]


def _finite(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def evidence_flags(evidence: Evidence) -> list[list[str]]:
    """Per timestep, the robust evidence worth a reviewer's eye, as short labels ("haze 15%",
    "cloud 5%", "shift 1.3 px", ...): each measure that exceeds the tolerance the score itself
    allows it by more than 2% (any amount for the shift). Cirrus counts above the tile's lowest,
    as in the score."""
    w = ROBUST_WEIGHTS
    cirrus = None if evidence.cirrus is None else evidence.cirrus - evidence.cirrus.min()
    # (label, value, tolerance, format)
    measures = [("haze", evidence.haze, w.haze_tolerance, "{:.0%}"), ("cloud", evidence.cloud, 0.0, "{:.0%}"),
                ("shadow", evidence.shadow, 0.0, "{:.0%}"), ("snow", evidence.snow, 0.0, "{:.0%}"),
                ("cirrus", cirrus, 0.0, "{:.0%}"),
                ("shift", evidence.misregistration_px, w.shift_tolerance, "{:.1f} px")]
    flags: list[list[str]] = [[] for _ in range(len(evidence.distance))]
    for name, values, tolerance, form in measures:
        if values is None:
            continue
        margin = 0.0 if name == "shift" else 0.02
        for i in np.flatnonzero(values > tolerance + margin):
            flags[i].append(f"{name} " + form.format(float(values[i])))
    return flags


def review_tile(rank: int, ranked: Ranked, hr: np.ndarray, series: np.ndarray, config: SelectionConfig,
                prediction: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> ReviewTile:
    """The page's view of one tile: the original HR [128, 128, C] and its series [T, 32, 32, C]
    (with the robust mode's extra bands `extra` [T, 32, 32], those the tile has); every valid
    timestep with its PSNR and score (`timestep_metrics`; the robust mode's among every valid
    timestep, with its `evidence_flags`), best PSNR first, as vertical sprites."""
    row = ranked.row
    valid = np.asarray(row["valid_indices"], dtype=np.int64)
    psnrs, scores, evidence = timestep_metrics(hr, series[valid], config,
                                               {name: band[valid] for name, band in (extra or {}).items()})
    flags = [[] for _ in valid] if evidence is None else evidence_flags(evidence)
    order = np.argsort(-psnrs, kind="stable")
    candidates = set(row["candidate_indices"])
    folder = f"tiles/{rank:05d}"
    written = {int(t): k for k, t in enumerate(row.get("lr_indices") or [row["lr_index"]])}
    steps = [{"t": int(valid[i]), "psnr": _finite(psnrs[i]), "score": round(float(scores[i]), 5),
              "candidate": int(valid[i]) in candidates, **({"flags": flags[i]} if flags[i] else {}),
              **({"written": written[int(valid[i])]} if len(written) > 1 and int(valid[i]) in written else {})}
             for i in order]
    stacked = series[valid[order]].reshape(-1, series.shape[2], series.shape[3])
    files = {f"{folder}/hr_rgb.png": encode_png(hr[..., :3]), f"{folder}/series_rgb.png": encode_png(stacked[..., :3])}
    if hr.shape[-1] >= 4:
        files[f"{folder}/hr_nir.png"] = encode_png(hr[..., 3])
        files[f"{folder}/series_nir.png"] = encode_png(stacked[..., 3])
    if prediction is not None:
        files[f"{folder}/prediction.png"] = encode_png(prediction[..., :3])
    entry = {
        "rank": rank,
        "tile_id": ranked.tile_id,
        "value": _finite(ranked.value),
        "dir": folder,
        "lr_index": int(row["lr_index"]),
        "lr_indices": [int(t) for t in (row.get("lr_indices") or [row["lr_index"]])],
        "selection": row["selection"],
        "n_timesteps": int(row["n_timesteps"]),
        "n_valid": int(valid.size),
        "psnr": _finite(float(row["psnr"])),
        "score": float(row["score"]),
        "prediction": prediction is not None,
        "steps": steps,
    }
    return ReviewTile(entry, files)


def asset(name: str) -> bytes:
    return importlib.resources.files("transforms.quality").joinpath("review_assets", name).read_bytes()


def review_id(run: str, metric: str, tile_ids: list[str]) -> str:
    """Stable for the same build, metric and tiles: reopening or regenerating the page keeps the
    decisions saved in the browser."""
    digest = hashlib.sha256("\n".join([run, metric, *tile_ids]).encode()).hexdigest()
    return digest[:16]


def data_js(meta: dict, entries: list[dict]) -> bytes:
    text = json.dumps({**meta, "tiles": entries}, indent=None, separators=(",", ":"), allow_nan=False)
    return ("window.S2NAIP_REVIEW = " + text.replace("</", "<\\/") + ";\n").encode()


def write_page(out_dir: str, meta: dict, review_tiles: Iterable[ReviewTile]) -> str:
    """Writes the page into `out_dir` (local or gs://): images first, data.js and the assets last.
    Returns the path of index.html."""
    entries = []
    for tile in review_tiles:
        for name, data in tile.files.items():
            storage.write_bytes_atomic(storage.join(out_dir, name), data)
        entries.append(tile.entry)
    meta = {**meta, "id": review_id(meta.get("run", ""), meta.get("metric", ""), [e["tile_id"] for e in entries])}
    storage.write_bytes_atomic(storage.join(out_dir, "data.js"), data_js(meta, entries))
    for name in ASSETS:
        storage.write_bytes_atomic(storage.join(out_dir, name), asset(name))
    return storage.join(out_dir, "index.html")
