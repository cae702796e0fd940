"""Cloud probability from s2cloudless, the field's standard pixel cloud detector, on S2-NAIP's bands.

s2cloudless (Sentinel Hub, PyPI `s2cloudless`) is a LightGBM model of 170 trees over ten
top-of-atmosphere reflectances, B01, B02, B04, B05, B08, B8A, B09, B10, B11, B12. S2-NAIP ships
them all but B8A: `tci` (B04, B03, B02 as ESA's 8-bit true colour, 255 ~ reflectance 0.3558 in L1C)
and `b01, b05, b08, b09, b10, b11, b12` (the 16-bit value / 8160 clipped to [0, 1], stored as 8-bit:
DN = raw // 32, so reflectance = (DN + 0.5) * 0.0032). B08 stands in for B8A (both near-infrared, 842 vs 865 nm).

The model file ships inside the s2cloudless wheel; it is read from the installed distribution
without importing the package (whose imports pull in OpenCV and sentinelhub) and evaluated here in
numpy, exactly (`predict` equals `lightgbm.Booster.predict` to float rounding), with every
(pixel, tree) pair descending the trees together: no LightGBM call overhead per tile.

Cost: the trees are evaluated on block means (`block` x `block` pixels, default 8: a 4 x 4 grid of
80 m cells per 32 x 32 timestep), which is how s2cloudless is meant to run (the provider's CLP is
computed at 160 m) and what keeps it within a few milliseconds per tile; the selection evaluates
only its best few candidates (`selection.RobustWeights.cloud_prob_candidates`).
"""
from __future__ import annotations

import functools
import importlib.metadata

import numpy as np

from transforms.evidence import BAND_REFLECTANCE, TCI_REFLECTANCE

MODEL_FILE = "s2cloudless/models/pixel_s2_cloud_detector_lightGBM_v0.1.txt"
# the model's features, in its order, and where S2-NAIP has each
MODEL_BANDS = ("b01", "b02", "b04", "b05", "b08", "b8a", "b09", "b10", "b11", "b12")
# the non-TCI S2-NAIP bands it needs (b08 also comes from an rgbn series' fourth channel)
CLOUD_BANDS = ("b01", "b05", "b08", "b09", "b10", "b11", "b12")
TCI_RED, TCI_BLUE = 0, 2


class CloudModelUnavailable(RuntimeError):
    """The s2cloudless distribution (and so its model file) is not installed."""


DESCENT_STEPS = 4  # levels descended between two looks for pairs that reached a leaf (measured: 3-6 alike)


def _paired_layout(feature, threshold, left, right, roots, n_leaves: int, sentinel: int):
    """The forest's nodes renumbered for `Forest.raw`: breadth first over all trees, each inner
    node's two children side by side (left, then right), leaves as nodes too. One gather of a packed
    word (first child << bits | feature) and one of the threshold then take a pair one level down:
    next = first child + (x > threshold). A leaf's word points at itself and compares the
    `sentinel` feature (-inf) with +inf, so a pair that reached its leaf stays there.

    Returns (word int64 [M], threshold float64 [M], leaf index or -1 [M], roots [trees], bits)."""
    n = len(feature)
    lo = np.where(left >= 0, left, n + ~left)  # old ids: inner nodes 0..n-1, leaf j -> n + j
    ro = np.where(right >= 0, right, n + ~right)
    levels, frontier = [np.asarray(roots)], np.asarray(roots)
    while frontier.size:
        inner = frontier[frontier < n]
        frontier = np.stack([lo[inner], ro[inner]], axis=1).ravel()
        levels.append(frontier)
    order = np.concatenate(levels)  # old id of each new position
    if order.size != n + n_leaves:
        raise ValueError("the model's trees do not cover every node once")
    new = np.empty(order.size, dtype=np.int64)
    new[order] = np.arange(order.size)
    is_leaf = order >= n
    inner_old = np.where(is_leaf, 0, order)
    first = np.where(is_leaf, np.arange(order.size), new[lo[inner_old]])
    feat = np.where(is_leaf, sentinel, feature[inner_old]).astype(np.int64)
    bits = np.int64(int(sentinel).bit_length())
    word = (first << bits) | feat
    thr = np.where(is_leaf, np.inf, threshold[inner_old])
    leaf_of = np.where(is_leaf, order - n, -1).astype(np.intp)
    return word, thr, leaf_of, new[np.asarray(roots)], np.asarray(bits)


class Forest:
    """A LightGBM binary model (numerical splits only) as flat node arrays over all its trees."""

    def __init__(self, text: str):
        feats, thrs, lefts, rights, leaf_values, roots = [], [], [], [], [], []
        n_nodes = n_leaves = 0
        header, _, body = text.partition("\nTree=")
        if "objective=binary sigmoid:1" not in header:
            raise ValueError("not a LightGBM binary (sigmoid 1) model")
        for block in ("Tree=" + body).split("\nTree="):
            block = block.split("\nend of trees")[0]
            kv = dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)
            if kv.get("num_cat", "0") != "0" or not set(kv["decision_type"].split()) <= {"0", "2"}:
                raise ValueError("only numerical '<=' splits are supported")
            split = np.array(kv["split_feature"].split(), dtype=np.intp)
            left = np.array(kv["left_child"].split(), dtype=np.intp)
            right = np.array(kv["right_child"].split(), dtype=np.intp)
            values = np.array(kv["leaf_value"].split(), dtype=np.float64)

            def globalise(child):  # inner nodes -> global index; leaf j -> -(global leaf index) - 1
                return np.where(child >= 0, child + n_nodes, ~(~child + n_leaves))

            feats.append(split)
            thrs.append(np.array(kv["threshold"].split(), dtype=np.float64))
            lefts.append(globalise(left))
            rights.append(globalise(right))
            leaf_values.append(values)  # already scaled by the shrinkage
            roots.append(n_nodes)
            n_nodes += len(split)
            n_leaves += len(values)
        self.feature = np.concatenate(feats)
        self.threshold = np.concatenate(thrs)
        self.left = np.concatenate(lefts)
        self.right = np.concatenate(rights)
        self.leaf_value = np.concatenate(leaf_values)
        self.roots = np.asarray(roots, dtype=np.intp)
        self.n_features = int(self.feature.max()) + 1
        self._paired = _paired_layout(self.feature, self.threshold, self.left, self.right, self.roots,
                                      len(self.leaf_value), sentinel=self.n_features)
        for a in (self.feature, self.threshold, self.left, self.right, self.leaf_value, self.roots, *self._paired):
            a.flags.writeable = False

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The summed leaf values of each row of x [P, F >= n_features]: [P] (descends every tree at
        once, in the paired layout of `_paired_layout`; the leaves, and so the sums, are those of a
        descent that follows each pair's left / right child level by level)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] < self.n_features:
            raise ValueError(f"expected [P, >= {self.n_features}] features, got {x.shape}")
        word, threshold, leaf_of, roots, bits = self._paired
        n_trees = len(roots)
        p = x.shape[0]
        width = self.n_features + 1
        flat = np.empty((p, width))
        flat[:, :-1] = x[:, : self.n_features]
        flat[:, -1] = -np.inf  # the sentinel feature every leaf compares: -inf <= inf, so it stays
        flat = flat.ravel()
        mask = (1 << int(bits)) - 1
        node = np.tile(roots, p)  # [P * trees], pixel-major
        base = np.repeat(np.arange(p) * width, n_trees)  # row offset into flat
        at = np.arange(p * n_trees)
        leaf = np.empty(p * n_trees, dtype=np.intp)
        while at.size:
            for _ in range(DESCENT_STEPS):  # a pair at a leaf stays there: check for leaves now and then
                w = word[node]
                go_right = ~(flat[base + (w & mask)] <= threshold[node])  # NaN goes right: `x <= threshold` is False
                node = (w >> bits) + go_right
            index = leaf_of[node]
            done = index >= 0
            leaf[at[done]] = index[done]
            keep = ~done
            node, base, at = node[keep], base[keep], at[keep]
        return self.leaf_value[leaf].reshape(p, n_trees).sum(axis=1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probability of the positive class (cloud) for each row of x [P, F]: [P]."""
        return 1.0 / (1.0 + np.exp(-self.raw(x)))


@functools.lru_cache(maxsize=1)
def model() -> Forest:
    """The s2cloudless model, parsed once per process (~0.5 s)."""
    try:
        path = importlib.metadata.distribution("s2cloudless").locate_file(MODEL_FILE)
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (importlib.metadata.PackageNotFoundError, OSError) as e:
        raise CloudModelUnavailable(f"s2cloudless model not found ({type(e).__name__}: {e}); "
                                    "pip install s2cloudless") from None
    return Forest(text)


def available(bands: dict, has_nir: bool = False) -> bool:
    """Whether `bands` (names -> arrays) holds what s2cloudless needs besides the TCI (b08 may
    come from an rgbn series instead, `has_nir`)."""
    return all(b in bands or (b == "b08" and has_nir) for b in CLOUD_BANDS)


def features(frames: np.ndarray, bands: dict[str, np.ndarray], block: int = 8) -> np.ndarray:
    """The model's ten reflectances, block-averaged: frames [K, C, H, W] uint8 (R, G, B[, NIR] as
    S2-NAIP's tci[, b08]), bands name -> [K, H, W] uint8 (CLOUD_BANDS; b08 may be missing when
    C = 4) -> float64 [K, H // block, W // block, 10]. Pixels beyond a whole block are left out."""
    k, c, h, w = frames.shape
    gh, gw = h // block, w // block
    if gh == 0 or gw == 0:
        raise ValueError(f"frames of {h}x{w} are smaller than one {block}x{block} block")
    nir = bands.get("b08", frames[:, 3] if c > 3 else None)
    if nir is None:
        raise ValueError("s2cloudless needs b08 (a band or the series' fourth channel)")
    planes = {"b02": frames[:, TCI_BLUE], "b04": frames[:, TCI_RED], "b08": nir, "b8a": nir}
    stack = np.stack([planes.get(b, bands.get(b)) for b in MODEL_BANDS], axis=-1)  # [K, H, W, 10] uint8
    tci = np.array([b in ("b02", "b04") for b in MODEL_BANDS])
    scale = np.where(tci, TCI_REFLECTANCE, BAND_REFLECTANCE)
    # S2-NAIP floors raw // 32: the middle of a DN's interval is its unbiased reflectance (half a
    # DN, 0.0016, moves s2cloudless's B10 and B09 splits noticeably)
    offset = np.where(tci, 0.0, 0.5)
    cells = stack[:, : gh * block, : gw * block].reshape(k, gh, block, gw, block, len(MODEL_BANDS))
    return (cells.mean(axis=(2, 4), dtype=np.float64) + offset) * scale


def cloud_probability_map(frames: np.ndarray, bands: dict[str, np.ndarray], block: int = 8) -> np.ndarray:
    """s2cloudless cloud probability per block, [K, H // block, W // block] in [0, 1]."""
    x = features(frames, bands, block)
    return model().predict(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


def cloud_probability(frames: np.ndarray, bands: dict[str, np.ndarray], block: int = 8) -> np.ndarray:
    """Mean s2cloudless cloud probability of each timestep, [K] in [0, 1] (see `features`)."""
    return cloud_probability_map(frames, bands, block).mean(axis=(-2, -1))
