"""The pipeline version, recorded in every pair row and run.json (setup.py reads it from here).

0.3.0: the robust selection's choices changed (the paper's SSIM distance plus veil evidence against
the clearest candidates and the HR, a dark gate; docs/selection-method.md).
0.3.1: the dark gate compares with the other timesteps' 0.1 quantile (was their lower quartile),
so the robust choice changes on series mostly veiled or cloudy (docs/selection-evaluation.md).
0.3.2: robust scores misregistration against the tile's consensus and the HR (`consensus_shift`),
so its choice changes where a date is displaced against both; its registration and SSIM moments
are computed in cheaper float32 forms (stored robust values move by ~1e-5, no choice changed)."""
PIPELINE_VERSION = "0.3.2"
