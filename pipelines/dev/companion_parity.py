"""`python -m pipelines.dev.companion_parity`: compare `select_pair(mode='companion')` with the paper's code.

Runs, on every tile of an S2-NAIP-layout folder, our companion-mode selection and the published
code's own `step_1_cloud_removal` + `step_2_metric` (ozendelait/better_s2_naip,
`pipeline_framework/main.py`, imported from a checkout given with --companion-repo; it needs torch,
torchvision, torchmetrics, scikit-image and tqdm, none of which this project depends on). Both get
the same decoded arrays (`transforms.pairs.load_tile`) and the same valid timesteps (the black-border
rule). The published code returns a position among the valid timesteps; it is mapped to the original
index before comparing. Three readings of the published code are compared:

  intended   step 1's index list as int64, the position mapped to its original index;
  as coded   step 1's uint8 `arange` (<= 16 valid timesteps) used as-is: recent torch reads it as a
             boolean mask, so the first valid timestep is never scored and the returned position is
             one short of the one scored best; the returned position mapped to its original index;
  scored     as coded, but the timestep its step 2 actually scored best (the defect's mask alone);
  as saved   the as-coded position used directly as an original index, as the published saving
             step and tracker.json do.

Also prints the largest difference between the per-candidate SSIM mixes of both (intended reading).
A research tool: nothing in the project imports it and no test needs it.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np

from pipelines.cli import ArgumentParser, description
from transforms.build.stages import list_naip_ids, list_tile_ids, manifest_lines_to_ids
from transforms.pairs import PairConfig, TileRejected, load_tile
from transforms.selection import NoValidTimesteps, SelectionConfig, select_pair
from transforms.tiles import InvalidTileId, TileId

NUM_IMGS_M1 = 16  # the published config's num_imgs_m1


def import_companion(repo: str):
    """(torch, the companion's pipeline_framework.main module) from a checkout at `repo`."""
    try:
        import torch
        import torchmetrics  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"companion_parity needs torch and torchmetrics (pip install torch torchvision "
                         f"torchmetrics tqdm); they are not project dependencies: {e}") from None
    sys.path.insert(0, repo)
    try:
        module = importlib.import_module("pipeline_framework.main")
    except ImportError as e:
        raise SystemExit(f"cannot import pipeline_framework.main from {repo!r}: {e}") from None
    finally:
        sys.path.remove(repo)
    return torch, module


class _ArgmaxRecorder:
    """Stands in for `torch` inside the companion module, keeping the scores its step 2 argmaxes."""

    def __init__(self, torch):
        self._torch = torch
        self.scores = None

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def argmax(self, values, *args, **kwargs):
        self.scores = values.detach().cpu().double().numpy()
        return self._torch.argmax(values, *args, **kwargs)


def run_companion(torch, module, hr: np.ndarray, valid_series: np.ndarray, intended: bool):
    """(returned position among the valid timesteps, positions of step 2's candidates, their SSIM
    mixes, position of the candidate step 2 scored best)."""
    hr_t = torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1)))
    lrs = torch.from_numpy(np.ascontiguousarray(valid_series.transpose(0, 3, 1, 2)))
    indices = module.step_1_cloud_removal(hr_t, lrs, NUM_IMGS_M1, "cpu")
    if intended:
        indices = indices.long()
    picked = indices.numpy()
    candidates = np.flatnonzero(picked) if indices.dtype == torch.uint8 else picked  # uint8: a mask
    position = module.step_2_metric(lrs[indices], hr_t, "cpu")
    mixes = module.torch.scores
    return int(indices[position].item()), candidates, mixes, int(candidates[np.argmax(mixes)])


def tile_ids(input_root: str, manifest: str | None):
    if manifest:
        with open(manifest) as f:
            for line in f:
                yield from manifest_lines_to_ids(line)
    else:
        for naip_id in list_naip_ids(input_root):
            yield from list_tile_ids(input_root, naip_id)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipelines.dev.companion_parity",
                                     description=description(__doc__))
    parser.add_argument("--companion-repo", required=True, help="checkout of ozendelait/better_s2_naip")
    parser.add_argument("--input", required=True, help="local S2-NAIP-layout folder")
    parser.add_argument("--nir-root", help="folder of naip/<id>/<x_y>/nir.png (default: --input)")
    parser.add_argument("--manifest", help="text file of tile ids (default: list --input)")
    parser.add_argument("--limit", type=int, help="compare at most this many tiles")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    torch, module = import_companion(args.companion_repo)
    module.torch = _ArgmaxRecorder(torch)
    warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")  # the defect measured
    pair_config = PairConfig(input_root=args.input, nir_root=args.nir_root)
    config = SelectionConfig(mode="companion")
    compared = few_valid = intended_same = coded_same = scored_same = saved_same = 0
    coded_errors = set_differs = 0
    skipped: dict[str, int] = {}
    max_diff = 0.0
    for tile_id in tile_ids(args.input, args.manifest):
        if args.limit is not None and compared >= args.limit:
            break
        try:
            inputs = load_tile(TileId.parse(tile_id), pair_config)
            ours = select_pair(inputs.hr, inputs.series, config)
        except (TileRejected, InvalidTileId, NoValidTimesteps) as e:
            reason = getattr(e, "reason", type(e).__name__)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        valid = ours.valid_indices
        compared += 1
        few_valid += valid.size <= NUM_IMGS_M1

        position, candidates, mixes, _ = run_companion(torch, module, inputs.hr, inputs.series[valid], True)
        intended_same += int(valid[position]) == ours.lr_index
        theirs = dict(zip(valid[candidates].tolist(), mixes))
        our_mixes = dict(zip(ours.candidate_indices.tolist(), 1.0 - ours.candidate_scores.astype(np.float64)))
        set_differs += theirs.keys() != our_mixes.keys()
        max_diff = max([max_diff] + [abs(our_mixes[i] - theirs[i]) for i in theirs.keys() & our_mixes.keys()])

        try:
            position, _, _, scored = run_companion(torch, module, inputs.hr, inputs.series[valid], False)
        except (RuntimeError, IndexError):  # one valid timestep: the mask leaves nothing to score
            coded_errors += 1
            continue
        coded_same += int(valid[position]) == ours.lr_index
        scored_same += int(valid[scored]) == ours.lr_index
        saved_same += position == ours.lr_index

    def rate(n: int) -> str:
        return f"{n}/{compared} = {100.0 * n / max(compared, 1):.2f}%"

    print(f"torch {torch.__version__}, torchmetrics {importlib.import_module('torchmetrics').__version__}")
    print(f"tiles compared:                          {compared}  (skipped: {skipped or 'none'})")
    print(f"tiles with <= {NUM_IMGS_M1} valid timesteps:         {few_valid}")
    print(f"agreement, intended companion:           {rate(intended_same)}")
    print(f"agreement, as coded (uint8 arange mask): {rate(coded_same)}  (errors: {coded_errors})")
    print(f"agreement, as coded, scored best:        {rate(scored_same)}")
    print(f"agreement, as saved (position as index): {rate(saved_same)}")
    print(f"tiles whose step-1 candidates differ:    {set_differs}")
    print(f"max |SSIM mix difference|, candidates:   {max_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
