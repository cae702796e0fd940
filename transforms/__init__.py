"""The library of s2naip-pairs, split by product (docs/architecture.md has the module-by-module map).

Top level, per tile and without Beam: tiles (ids, layout) -> imagery (decode) -> selection (+ evidence,
cloud_prob) -> corrections -> pairs (one tile from id to outcome) -> records (the one schema);
progress, runtime, version.

* build/    the `s2naip build` job: pipeline.BuildDataset (the one build PTransform) and build(),
            stages (ids -> pairs -> writers -> run.json, _SUCCESS), increments (fingerprint, plan,
            carry forward, manifest rows), fingerprints, object_meta, dataset_manifest
* io/       storage (join, open_file, local and gs://), prefetch, readers, sinks, example_proto,
            publish, latest
* nir/      fetch-nir and plan: pipeline.FetchNir and its DoFns, nir_fetch, plan, stac, signing, geo
* quality/  review_page (+ review_assets/), report_figures, report_page
* devdata/  sample (procedural), hard_cases, real_s2 (+ data/), real_tiles
"""
