"""Corrections: the black-border threshold of a manual pick, the join's counters and the file-size
limit (mutation testing found them unpinned: see docs/testing.md)."""
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from tests.tile_factory import scene, series_from
from transforms import corrections
from transforms.corrections import BadCorrection, Correction
from transforms.selection import SelectionConfig


def _series():
    rng = np.random.default_rng(4)
    return series_from(scene(rng), rng, 4)


def test_a_manual_pick_at_exactly_max_border_black_is_allowed():
    series = _series()
    series[1, 0, 10, :3] = 0  # one black pixel: the default allows it
    assert corrections.check_correction(Correction(1), series) == 1
    series[1, 31, 10, :3] = 0  # two: a black border
    with pytest.raises(BadCorrection, match="black border"):
        corrections.check_correction(Correction(1), series)
    assert corrections.check_correction(Correction(1), series, SelectionConfig(max_border_black=2)) == 1


def test_join_counts_matched_and_unmatched_entries(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a/1_1": 3, "b/2_2": None, "zz/9_9": 1}))
    p = beam.Pipeline(runner="FnApiRunner")
    joined = p | beam.Create(["a/1_1", "b/2_2", "c/3_3"]) | corrections.JoinCorrections([str(path)])
    summary = joined | beam.Map(lambda kv: (kv[0], None if kv[1] is None else (kv[1].value, kv[1].removes)))
    assert_that(summary, equal_to([("a/1_1", (3, False)), ("b/2_2", (None, True)), ("c/3_3", None)]))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("corrections"))["counters"]}
    assert counters == {"matched": 2, "unmatched": 1}


def test_corrections_files_up_to_one_gib_are_read(monkeypatch):
    asked = []
    monkeypatch.setattr(corrections.storage, "read_bytes", lambda path, limit: asked.append(limit) or b"{}")
    assert corrections.load_corrections(["x.json"]) == {}
    assert asked == [1024 ** 3]
