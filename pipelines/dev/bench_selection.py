"""`s2naip bench-selection`: every selection mode on twin-free, real and easy evaluation sets.

Evaluation sets (`build_sets`; each row of the table is a set seen through some bands):

  twin-free hard   synthetic (`transforms.devdata.hard_cases`, from the real NAIP captures of --real-data):
                   HR date left out; each planted subtle timestep (haze, thin cloud, cumulus with
                   shadows, large shadow, partial snow, 1-2 px misregistration) *replaces* the clean
                   frame of its date, so no clean twin stays (the main synthetic set)
  easy             synthetic, HR date left out, obvious bad timesteps only (thick cloud, dark,
                   black swath edge), with their clean twins
  easy+hr          the same with the HR's own date in the series: same-date = how often it is chosen
  twin hard        the former hard set (extra row): each planted timestep keeps its clean twin
  real S2          real Sentinel-2 L1C (`transforms.devdata.real_s2`, --real-s2): 32x32 chips, a clear date
                   as HR (upsampled 4x, NAIP-like radiometry), its own date left out, the other real
                   dates as the series; every timestep labelled by eye (transforms/devdata/data/eolearn_labels.json)
  real S2+hr       the same with the HR's own date in the series: same-date on real imagery
  semi-real S2     real clear frames veiled with the real s2cloudless cloud shapes of 68 dates
                   (haze, thin cloud, cloud with its shadow, shadow alone), twin-free
  real S2 L2A      real Sentinel-2 L2A series (`transforms.devdata.real_s2_series`, --real-s2-series: the
                   cube the PyPI package nrt 0.2.1 ships, fetched by SHA-256): 32x32 chips, a clean
                   June-September date as HR (upsampled 4x), its own date left out, the other
                   June-September dates of its year (7-18) as the series: real cumulus and shadows,
                   overcast, cirrus, iridescent thin cloud, haze; labelled by eye
                   (transforms/devdata/data/nrt_romania_labels.json)
  real S2 L2A+hr   the same with the HR's own date in the series: same-date on real imagery
  real S2 L1C      a second real place: the two real L1C chips of Lithuania, 2020 (5 and 7 dates, cloud,
                   cloud shadow, haze) stored as test data in sentinel-hub/multi-temporal-super-resolution,
                   imported into the --real-s2-series cache folder (mtsr/) by `python -m
                   transforms.devdata.real_s2_series import-mtsr CHECKOUT` (SHA-256 pinned; built
                   when present); HR = a clean date upsampled 4x, its own date left out; labelled by eye
                   (transforms/devdata/data/mtsr_lithuania_labels.json)
  real S2 L1C+hr   the same with the HR's own date in the series

Bands per row: `tci+b08` (R, G, B, NIR: the default build), `rgb` (`--bands rgb`), `all` (tci+b08
plus every extra band the set has and `transforms.selection.EXTRA_BANDS` accepts).

Every tile belongs to a fixed tune or held-out part (synthetic: 3x3-tile blocks, `hard_cases.
split_tiles`; real: by a hash of the chip id, `real_s2.is_held_out`); figures are printed for each
part separately. The held-out part is never to be tuned on.

Columns per mode: % of chosen timesteps that are clean (unperturbed / labelled clean), % same-date
(the HR's own date chosen, only where it is in the series), counts chosen of each bad kind, and
the per-tile cost of the selection core. `evaluate(eval_set, selector)` measures any callable
`selector(hr, series, extra) -> lr_index`, e.g. an ablation (`evaluate_rows`: every row at once);
`mode_selector(mode)` wraps a mode.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from pipelines.cli import ArgumentParser, description
from pipelines.dev.bench import machine
from transforms import runtime
from transforms import selection as S
from transforms.devdata import hard_cases as H

TUNE, HELD_OUT = "tune", "held-out"
PARTS = (TUNE, HELD_OUT)
BANDS = ("tci+b08", "rgb", "all")

# (set name, bands) rows of the table, in order; a set absent from the sources is skipped.
ROWS = (
    ("twin-free hard", "tci+b08"),
    ("twin-free hard", "rgb"),
    ("twin-free hard", "all"),
    ("real S2 L2A", "rgb"),
    ("real S2 L2A", "tci+b08"),
    ("real S2 L2A", "all"),
    ("real S2 L1C", "rgb"),
    ("real S2 L1C", "tci+b08"),
    ("real S2", "rgb"),
    ("real S2", "all"),
    ("semi-real S2", "rgb"),
    ("semi-real S2", "all"),
    ("real S2+hr", "rgb"),
    ("real S2 L2A+hr", "rgb"),
    ("real S2 L1C+hr", "rgb"),
    ("easy", "tci+b08"),
    ("easy", "rgb"),
    ("easy+hr", "tci+b08"),
    ("easy+hr", "rgb"),
    ("twin hard", "tci+b08"),
    ("twin hard", "rgb"),
    ("twin hard", "all"),
)
SYNTHETIC_SETS = ("twin-free hard", "easy", "easy+hr", "twin hard")
REAL_SETS = ("real S2", "real S2+hr", "semi-real S2")
REAL_SERIES_SETS = ("real S2 L2A", "real S2 L2A+hr")
MTSR_SETS = ("real S2 L1C", "real S2 L1C+hr")  # in the same cache folder (mtsr/), when imported
ALL_SETS = SYNTHETIC_SETS + REAL_SETS + REAL_SERIES_SETS + MTSR_SETS

# The targets for the default mode (held-out part).
TARGETS = {
    ("real S2", "rgb"): 0.97,
    ("real S2 L2A", "rgb"): 0.97,
    ("real S2 L1C", "rgb"): 0.97,
    ("twin-free hard", "tci+b08"): 0.90,
    ("easy", "tci+b08"): 1.0,
    ("easy+hr", "tci+b08"): 1.0,
    ("semi-real S2", "rgb"): None,  # no % target: shown against paper
    ("semi-real S2", "all"): None,
}
TARGET_SAME_DATE = 0.94  # easy+hr
TARGET_COST = 1.5  # default's selection core vs paper's

Selector = Callable[[np.ndarray, np.ndarray, "dict[str, np.ndarray] | None"], int]


@dataclasses.dataclass
class EvalSet:
    """Tiles of one evaluation set (all bands kept; `view` slices them per row)."""

    name: str
    source: str  # "synthetic", "real" or "semi-real"
    tiles: list[H.DevTile]
    held_out: frozenset[str]  # tile ids of the held-out part; every other tile is in the tune part
    same_date: bool  # the HR's own date is in the series (the same-date figure is meaningful)
    note: str = ""

    def part(self, tile: H.DevTile) -> str:
        return HELD_OUT if tile.tile_id in self.held_out else TUNE

    def view(self, tile: H.DevTile, bands: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
        """(hr, series, extra) of `tile` as a build with `bands` would read them."""
        if bands == "rgb":
            return tile.hr[..., :3], tile.series[..., :3], None
        if bands == "tci+b08":
            return tile.hr, tile.series, None
        if bands == "all":
            return tile.hr, tile.series, {k: v for k, v in tile.extra.items() if k in S.EXTRA_BANDS}
        raise ValueError(f"bands must be one of {BANDS}, got {bands!r}")


def mode_selector(mode: str, **config) -> Selector:
    """A selector running `select_pair` in `mode` (other SelectionConfig fields from `config`)."""
    cfg = S.SelectionConfig(mode=mode, **config)

    def select(hr, series, extra):
        return S.select_pair(hr, series, cfg, extra).lr_index

    return select


# ---------------------------------------------------------------------------------------------
# Sets


def synthetic_sets(real_data: str, *, seed: int = 100, names: Sequence[str] = SYNTHETIC_SETS,
                   max_tiles: int | None = None) -> list[EvalSet]:
    """The synthetic sets built on the real NAIP captures of `real_data` (tune and held-out tiles)."""
    mosaic = H.CaptureMosaic(real_data)
    usable = mosaic.usable_tiles()
    tune, held = H.split_tiles(usable)
    if max_tiles is not None:  # the same share of each part
        n_held = max(1, round(max_tiles * len(held) / len(usable)))
        tune, held = tune[:max(1, max_tiles - n_held)], held[:n_held]
    xys = tune + held
    held_xy = set(held)
    specs = {
        "twin-free hard": dict(seed=seed + 3, plant=H.HARD_PLANT, twin_free=True),
        "easy": dict(seed=seed + 1, plant=H.EASY_PLANT),
        "easy+hr": dict(seed=seed + 2, plant=H.EASY_PLANT, include_hr_date=True),
        "twin hard": dict(seed=seed, plant=H.HARD_PLANT),
    }
    out = []
    for name in names:
        tiles = H.build_dev_tiles(mosaic, xys, **specs[name])
        held_ids = frozenset(t.tile_id for t, xy in zip(tiles, xys) if xy in held_xy)
        out.append(EvalSet(name, "synthetic", tiles, held_ids, same_date=name == "easy+hr"))
    return out


def real_sets(real_s2: str, *, seed: int = 100, names: Sequence[str] = REAL_SETS) -> list[EvalSet]:
    """The real and semi-real Sentinel-2 sets from `real_s2` (the folder holding eolearn/)."""
    from transforms.devdata import real_s2 as R

    data = R.load_eolearn(os.path.join(real_s2, "eolearn") if os.path.isdir(os.path.join(real_s2, "eolearn"))
                          else real_s2)
    out = []
    for name in names:
        if name == "real S2":
            tiles = R.real_tiles(data)
            note = "real L1C dates, labelled by eye"
        elif name == "real S2+hr":
            tiles = R.real_tiles(data, include_hr_date=True)
            note = "real L1C dates with the HR's own date in the series"
        elif name == "semi-real S2":
            tiles = R.semi_real_tiles(data, seed=seed)
            note = "real clear frames veiled with real s2cloudless cloud shapes"
        else:
            raise ValueError(f"unknown real set {name!r}; expected some of {REAL_SETS}")
        held = frozenset(t.tile_id for t in tiles if R.is_held_out(t.tile_id))
        out.append(EvalSet(name, "semi-real" if name == "semi-real S2" else "real", tiles, held,
                           same_date=name == "real S2+hr", note=note))
    return out


def _real_eval_sets(tiles_of, names: Sequence[str], allowed: Sequence[str], what: str, note: str) -> list[EvalSet]:
    """EvalSets of a real source: `tiles_of(include_hr_date)` its tiles; the name ending in "+hr"
    holds the HR's own date (same-date figure); held-out by `real_s2.is_held_out`."""
    from transforms.devdata import real_s2 as R

    out = []
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown {what} set {name!r}; expected some of {tuple(allowed)}")
        same = name.endswith("+hr")
        tiles = tiles_of(same)
        held = frozenset(t.tile_id for t in tiles if R.is_held_out(t.tile_id))
        out.append(EvalSet(name, "real", tiles, held, same_date=same,
                           note=note + (" with the HR's own date" if same else "")))
    return out


def real_series_sets(real_s2_series: str, *, names: Sequence[str] = REAL_SERIES_SETS) -> list[EvalSet]:
    """The real Sentinel-2 L2A series sets from `real_s2_series` (the fetched cube or its cache folder)."""
    from transforms.devdata import real_s2_series as RS

    cube = RS.load(real_s2_series)
    return _real_eval_sets(lambda same: RS.series_tiles(cube, include_hr_date=same), names, REAL_SERIES_SETS,
                           "real series", "real L2A June-September series, labelled by eye")


def mtsr_sets(real_s2_series: str, *, names: Sequence[str] = MTSR_SETS) -> list[EvalSet]:
    """The real Sentinel-2 L1C sets (transforms.devdata.real_s2_series MTSR_*: two chips in Lithuania)
    from the mtsr/ folder of the real series' cache."""
    from transforms.devdata import real_s2_series as RS

    chips = RS.load_mtsr(real_s2_series)
    return _real_eval_sets(lambda same: RS.mtsr_tiles(chips, include_hr_date=same), names, MTSR_SETS,
                           "real L1C", "real L1C chips of Lithuania 2020, labelled by eye")


def build_sets(real_data: str | None = None, real_s2: str | None = None, *, seed: int = 100,
               names: Sequence[str] | None = None, max_tiles: int | None = None,
               real_s2_series: str | None = None) -> list[EvalSet]:
    """Every evaluation set the sources allow (`names`: a subset)."""
    names = list(names) if names else list(ALL_SETS)
    if unknown := set(names) - set(ALL_SETS):
        raise ValueError(f"unknown sets {sorted(unknown)}; expected some of {ALL_SETS}")
    out = []
    if real_data and (syn := [n for n in SYNTHETIC_SETS if n in names]):
        out += synthetic_sets(real_data, seed=seed, names=syn, max_tiles=max_tiles)
    if real_s2 and (real := [n for n in REAL_SETS if n in names]):
        out += real_sets(real_s2, seed=seed, names=real)
    if real_s2_series and (series := [n for n in REAL_SERIES_SETS if n in names]):
        out += real_series_sets(real_s2_series, names=series)
    if real_s2_series and (l1c := [n for n in MTSR_SETS if n in names]):
        from transforms.devdata.real_s2_series import has_mtsr

        if has_mtsr(real_s2_series) or names != list(ALL_SETS):  # asked for by name: missing files fail
            out += mtsr_sets(real_s2_series, names=l1c)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring


def is_clean(tile: H.DevTile, j: int) -> bool:
    return tile.kinds[j] == H.CLEAN


def evaluate(eval_set: EvalSet, selector: Selector, bands: str = "tci+b08",
             choices: Sequence[int] | None = None) -> dict:
    """Figures of `selector` on `eval_set` seen through `bands`, per part (tune, held-out):
    {part: {"tiles", "clean", "same_date", "chosen": {bad kind: n}}, "lr_index": [...]}.
    `choices` (lr_index per tile) skips running the selector."""
    if choices is None:
        choices = [int(selector(*eval_set.view(t, bands))) for t in eval_set.tiles]
    out = {"lr_index": list(choices)}
    for part in PARTS:
        pairs = [(t, j) for t, j in zip(eval_set.tiles, choices) if eval_set.part(t) == part]
        kinds = collections.Counter(t.kinds[j] for t, j in pairs)
        same = [t.capture_of_index[j] == t.hr_date and is_clean(t, j) for t, j in pairs]
        out[part] = {
            "tiles": len(pairs),
            "clean": kinds[H.CLEAN] / len(pairs) if pairs else None,
            "same_date": (sum(same) / len(pairs)) if (pairs and eval_set.same_date) else None,
            "chosen": {k: n for k, n in sorted(kinds.items()) if k != H.CLEAN},
        }
    return out


def evaluate_rows(sets: Sequence[EvalSet], selector: Selector, rows: Sequence[tuple[str, str]] = ROWS) -> dict:
    """{(set name, bands): evaluate(...)} of `selector` on every row of `rows` whose set is in `sets`
    (an ablation over the whole table in one call; no timing)."""
    by_name = {s.name: s for s in sets}
    return {(name, bands): evaluate(by_name[name], selector, bands) for name, bands in rows if name in by_name}


def run_row(eval_set: EvalSet, bands: str, modes: Sequence[str], repeats: int = 1) -> dict[str, dict]:
    """Each mode on one row; modes interleaved per tile in rotating order, `repeats` timing runs."""
    selectors = {m: mode_selector(m) for m in modes}
    views = [eval_set.view(t, bands) for t in eval_set.tiles]
    chosen = {m: [0] * len(views) for m in modes}
    per_repeat = {m: [] for m in modes}
    for r in range(repeats):
        spent = dict.fromkeys(modes, 0.0)
        for i, view in enumerate(views):
            k = (i + r) % len(modes)
            for m in list(modes[k:]) + list(modes[:k]):
                t0 = time.perf_counter()
                chosen[m][i] = int(selectors[m](*view))
                spent[m] += time.perf_counter() - t0
        for m in modes:
            per_repeat[m].append(1e3 * spent[m] / max(len(views), 1))
    out = {}
    for m in modes:
        out[m] = evaluate(eval_set, selectors[m], bands, chosen[m])
        out[m]["ms_per_tile"] = statistics.median(per_repeat[m])
        out[m]["ms_per_tile_repeats"] = per_repeat[m]
    return out


def bench(real_data: str | None = None, real_s2: str | None = None, *, seed: int = 100, repeats: int = 1,
          max_tiles: int | None = None, modes: Sequence[str] | None = None,
          sets: Sequence[str] | None = None, rows: Sequence[tuple[str, str]] = ROWS,
          real_s2_series: str | None = None) -> dict:
    if not real_data and not real_s2 and not real_s2_series:
        raise ValueError("give real_data (NAIP GeoTIFFs) and/or real_s2 / real_s2_series (real Sentinel-2)")
    runtime.tune_selection_process()  # as the pipeline's workers do
    modes = list(modes or S.SELECTION_MODES)
    t0 = time.perf_counter()
    built = {s.name: s for s in build_sets(real_data, real_s2, seed=seed, names=sets, max_tiles=max_tiles,
                                           real_s2_series=real_s2_series)}
    build_s = time.perf_counter() - t0
    results = []
    for name, bands in rows:
        if name not in built:
            continue
        s = built[name]
        if bands == "all" and not any(k in S.EXTRA_BANDS for t in s.tiles[:1] for k in t.extra):
            continue
        results.append({"set": name, "source": s.source, "bands": bands, "note": s.note,
                        "mean_timesteps": float(np.mean([t.n_timesteps for t in s.tiles])),
                        "modes": run_row(s, bands, modes, repeats)})
    if not results:
        raise ValueError(f"no evaluation set to run: sets {list(sets or [])} need their sources "
                         f"(real_data={real_data!r}, real_s2={real_s2!r}, real_s2_series={real_s2_series!r})")
    result = {
        "real_data": os.path.abspath(real_data) if real_data else None,
        "real_s2": os.path.abspath(real_s2) if real_s2 else None,
        "real_s2_series": os.path.abspath(real_s2_series) if real_s2_series else None,
        "seed": seed,
        "repeats": repeats,
        "default_mode": S.DEFAULT_SELECTION,
        "build_seconds": build_s,
        "rows": results,
        "machine": machine(),
    }
    result["checks"] = checks(results, S.DEFAULT_SELECTION)
    return result


def _row(results, name, bands):
    return next((r for r in results if r["set"] == name and r["bands"] == bands), None)


def checks(results: list[dict], default: str) -> dict:
    """The issue's targets for `default` on the held-out part, and its standing against paper."""
    out = {"mode": default}
    for (name, bands), target in TARGETS.items():
        r = _row(results, name, bands)
        if r is None or default not in r["modes"]:
            continue
        got = r["modes"][default][HELD_OUT]["clean"]
        paper = r["modes"].get("paper", {}).get(HELD_OUT, {}).get("clean")
        out[f"{name} {bands}"] = {"clean": got, "target": target,
                                  "ok": None if target is None else (got is not None and got >= target),
                                  "paper": paper, "not_below_paper": paper is None or got >= paper}
    r = _row(results, "easy+hr", "tci+b08")
    if r and default in r["modes"]:
        got = r["modes"][default][HELD_OUT]["same_date"]
        out["same_date easy+hr"] = {"same_date": got, "target": TARGET_SAME_DATE, "ok": got >= TARGET_SAME_DATE}
    r = _row(results, "twin-free hard", "tci+b08") or (results[0] if results else None)
    if r and default in r["modes"] and "paper" in r["modes"] and default != "paper":
        ratio = r["modes"][default]["ms_per_tile"] / r["modes"]["paper"]["ms_per_tile"]
        out["cost"] = {"row": f"{r['set']} {r['bands']}", "ratio_vs_paper": ratio, "target": TARGET_COST,
                       "ok": ratio <= TARGET_COST}
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report_text(r: dict) -> str:
    m = r["machine"]
    modes = list(r["rows"][0]["modes"]) if r["rows"] else []
    lines = [
        f"s2naip selection bench: seed {r['seed']}, default mode {r['default_mode']}, "
        f"{m['cpu']} ({m['cores']} cores); % clean picks (same-date %), tune | held-out",
    ]
    head = f"  {'set':<15} {'bands':<8} {'tiles':>9} {'T':>4}  " + "  ".join(f"{mode:>21}" for mode in modes)
    lines += [head, "  " + "-" * (len(head) - 2)]
    for row in r["rows"]:
        first = row["modes"][modes[0]]
        n = f"{first[TUNE]['tiles']}|{first[HELD_OUT]['tiles']}"
        cells = []
        for mode in modes:
            x = row["modes"][mode]
            cell = f"{_pct(x[TUNE]['clean'])} | {_pct(x[HELD_OUT]['clean'])}"
            if x[HELD_OUT]["same_date"] is not None:
                cell = (f"{_pct(x[TUNE]['clean'])}({_pct(x[TUNE]['same_date'])})|"
                        f"{_pct(x[HELD_OUT]['clean'])}({_pct(x[HELD_OUT]['same_date'])})")
            cells.append(f"{cell:>21}")
        lines.append(f"  {row['set']:<15} {row['bands']:<8} {n:>9} {row['mean_timesteps']:>4.1f}  " + "  ".join(cells))
    lines += ["", "  bad picks (tune + held-out) and ms per tile:"]
    for row in r["rows"]:
        for mode in modes:
            x = row["modes"][mode]
            bad = collections.Counter(x[TUNE]["chosen"]) + collections.Counter(x[HELD_OUT]["chosen"])
            lines.append(f"  {row['set']:<15} {row['bands']:<8} {mode:<10} {x['ms_per_tile']:>6.2f} ms  "
                         + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "-"))
    c = r.get("checks") or {}
    ok = {True: "ok", False: "MISSED"}
    lines += ["", f"  targets of the default ({c.get('mode')}), held-out part:"]
    for key, v in c.items():
        if key == "mode":
            continue
        if key == "cost":
            lines.append(f"    core cost on {v['row']}: {v['ratio_vs_paper']:.2f}x paper "
                         f"(<= {v['target']}x: {ok[v['ok']]})")
        elif key.startswith("same_date"):
            lines.append(f"    {key}: {_pct(v['same_date'])}% (>= {_pct(v['target'])}%: {ok[v['ok']]})")
        else:
            target = "" if v["target"] is None else f">= {_pct(v['target'])}%: {ok[v['ok']]}; "
            lines.append(f"    {key}: {_pct(v['clean'])}% clean ({target}"
                         f"paper {_pct(v['paper'])}%, not below paper: {ok[v['not_below_paper']]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="s2naip bench-selection", description=description(__doc__))
    parser.add_argument("--real-data", default=None,
                        help="folder of real NAIP GeoTIFFs of one quarter quad (m_*.tif), e.g. ../shared/data/naip_real: "
                             "the synthetic sets")
    parser.add_argument("--real-s2", default=None,
                        help="folder of real Sentinel-2 (holding eolearn/), e.g. ../shared/data/real_s2: the real sets")
    parser.add_argument("--real-s2-series", default=None,
                        help="the real Sentinel-2 L2A series (its cache folder or the .nc file), fetched from PyPI by "
                             "`python -m transforms.devdata.real_s2_series fetch [DIR]`: the real S2 L2A sets (and the real S2 "
                             "L1C sets when its mtsr/ holds the imported chips)")
    parser.add_argument("--sets", default=None,
                        help="comma-separated sets (default: all the sources allow): " + ", ".join(ALL_SETS))
    parser.add_argument("--seed", type=int, default=100, help="planting seed")
    parser.add_argument("--repeats", type=int, default=1, help="timing runs (choices are deterministic)")
    parser.add_argument("--max-tiles", type=int, default=None, help="synthetic sets: at most this many tiles")
    parser.add_argument("--modes", default=",".join(S.SELECTION_MODES), help="comma-separated selection modes")
    parser.add_argument("--report", default=os.path.join("bench-out", "bench_selection.json"),
                        help="JSON file for the figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(S.SELECTION_MODES):
        parser.error(f"unknown modes {sorted(unknown)}; expected some of {S.SELECTION_MODES}")
    if not args.real_data and not args.real_s2 and not args.real_s2_series:
        parser.error("give --real-data and/or --real-s2 and/or --real-s2-series")
    for flag, path in (("--real-data", args.real_data), ("--real-s2", args.real_s2)):
        if path and not os.path.isdir(path):
            parser.error(f"{flag} {path!r} is not a folder")
    if args.real_s2_series:
        from transforms.devdata.real_s2_series import locate

        if not locate(args.real_s2_series).is_file():
            parser.error(f"--real-s2-series {args.real_s2_series!r} holds no {locate(args.real_s2_series).name}; "
                         "fetch it: python -m transforms.devdata.real_s2_series fetch DIR")
    sets = [s for s in args.sets.split(",") if s] if args.sets else None
    if sets and (unknown := set(sets) - set(ALL_SETS)):
        parser.error(f"unknown sets {sorted(unknown)}; expected some of {ALL_SETS}")
    if sets and args.real_s2_series and [n for n in sets if n in MTSR_SETS]:
        from transforms.devdata.real_s2_series import has_mtsr, mtsr_folder

        if not has_mtsr(args.real_s2_series):
            parser.error(f"sets {[n for n in sets if n in MTSR_SETS]} need the L1C chips in "
                         f"{mtsr_folder(args.real_s2_series)}: python -m transforms.devdata.real_s2_series "
                         "import-mtsr CHECKOUT DIR")
    for names, flag, given in ((SYNTHETIC_SETS, "--real-data", args.real_data), (REAL_SETS, "--real-s2", args.real_s2),
                               (REAL_SERIES_SETS + MTSR_SETS, "--real-s2-series", args.real_s2_series)):
        if sets and not given and (need := [n for n in sets if n in names]):
            parser.error(f"sets {need} need {flag}")
    result = bench(args.real_data, args.real_s2, seed=args.seed, repeats=args.repeats,
                   max_tiles=args.max_tiles, modes=modes, sets=sets, real_s2_series=args.real_s2_series)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
        json.dump(result, f, indent=2)
    print(report_text(result))
    print(f"figures: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
