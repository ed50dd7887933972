"""The pass rules of a parity certificate: tolerances per precision and the verdict band.

Numbers, per precision:

- **FP32** engines compute the same math in another order, so they must match PyTorch to float
  rounding: max |Δ| over every map pixel ≤ 1e-4, every score within 1e-4 relative. Where an
  output misses that bound it still passes if its max error against the model evaluated in
  float64 is at most ``noise_floor_factor`` (2) times PyTorch FP32's own (the SSIM map: var =
  E[x²] − μ² cancels in flat regions, so FP32 itself is ~2.5e-4 from float64 there).
- **FP16 / INT8 / BF16** change the numbers by design; what must not change is what the line sees: image
  and pixel AUROC within 0.005 (FP16) / 0.01 (INT8, and BF16: OpenVINO's BF16 keeps 8 significant
  bits, as INT8 keeps 256 levels) of the reference.
- Every precision: **the OK/NG verdicts agree**, by the band rule below. Polygraphy's element-wise
  atol/rtol rule is reported for every engine and decides nothing (its docs say its defaults suit
  FP32 only).

The verdict band. The threshold is the 99th percentile of the validation scores, so it always
sits between the highest validation scores: an image whose reference score lies a hair from the
threshold flips on rounding alone (GANomaly 256 FP16: 1.1e-6 above it). So a flip counts only
where the reference score lies **further from the threshold than the band**

    band = max(spread · (score_max − score_min of the validation scores), floor · |threshold|)

with spread = 0.1% (FP32), 1% (FP16), 2% (INT8) of the normal score range: an engine that moves
a score by more than that is not rounding, and a part that close to the threshold is a coin flip
for any engine. The floor (1e-6, 1e-5, 1e-4 of the threshold) only guards a degenerate range; it
is kept small because scores can carry a large offset (GANomaly's latent distance: range 1-2% of
the threshold), where a threshold-relative band would swallow every image. Both terms come from
the bundle and the precision, never from the engine's measured error, so a bad engine cannot
widen its own band. Flips inside the band are reported apart and do not fail. Images outside
the band are the *decisive* ones: the certificate needs at least ``MIN_DECISIVE`` (30) of them,
and ≥ 99% of them must agree (with fewer than 100 decisive images: none may flip). Each
certificate also states the 95% upper confidence bound on the flip rate that its count supports
(Clopper-Pearson: 3/n for no flip).

Post-processing on the engine (``detector_post``): its smoothed map, normalised score and
normalised map must equal the host path applied to the engine's own raw outputs within
``POSTPROCESS_ATOL`` (of the calibrated map range for the smoothed map, absolute for the [0, 1]
normalised outputs) at every precision: it is an FP32 island, so only summation order differs.
"""

from __future__ import annotations

import math
from typing import Any

POSTPROCESS_ATOL = 1e-5

import numpy as np

from edgead.core.calibration import Calibration

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"map_max_abs": 1e-4, "score_max_rel": 1e-4, "noise_floor_factor": 2.0, "atol": 1e-4, "rtol": 1e-4,
             "min_verdict_agreement": 0.99},
    "fp16": {"max_abs_delta_auroc": 0.005, "min_verdict_agreement": 0.99, "atol": 1e-2, "rtol": 1e-2},
    "int8": {"max_abs_delta_auroc": 0.01, "min_verdict_agreement": 0.99, "atol": 5e-2, "rtol": 5e-2},
}
TOLERANCES["bf16"] = dict(TOLERANCES["int8"])  # 8 significant bits, as INT8 has 256 levels

VERDICT_BAND: dict[str, dict[str, float]] = {
    "fp32": {"spread": 1e-3, "floor": 1e-6},
    "fp16": {"spread": 1e-2, "floor": 1e-5},
    "int8": {"spread": 2e-2, "floor": 1e-4},
}
VERDICT_BAND["bf16"] = dict(VERDICT_BAND["int8"])
MIN_DECISIVE = 30  # decisive images a verdict agreement needs before it means anything


def band(calibration: Calibration, precision: str) -> float:
    rule = VERDICT_BAND[precision]
    spread = calibration.score_max - calibration.score_min
    return max(rule["spread"] * spread, rule["floor"] * abs(calibration.image_threshold))


def flip_rate_upper(flips: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson upper bound on the flip rate after ``flips`` of ``n`` (bisection on the
    binomial CDF: numpy and math only, as a station has them)."""
    if n <= 0:
        return 1.0
    if flips >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(flips + 1))

    lo, hi = flips / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def verdict_agreement(ref_scores: np.ndarray, got_scores: np.ndarray, calibration: Calibration,
                      precision: str) -> dict[str, Any]:
    """The band rule on one engine's scores: decisive images, flips in and outside the band."""
    width = band(calibration, precision)
    t = calibration.image_threshold
    ref_v = [calibration.verdict(float(s)) for s in ref_scores]
    got_v = [calibration.verdict(float(s)) for s in got_scores]
    decisive = [abs(float(r) - t) > width for r in ref_scores]
    flips = [{"index": i, "reference": float(ref_scores[i]), "engine": float(got_scores[i]), "threshold": t,
              "distance": float(ref_scores[i]) - t, "in_band": not decisive[i]}
             for i, (a, b) in enumerate(zip(ref_v, got_v)) if a != b]
    n_decisive = int(sum(decisive))
    outside = [f for f in flips if not f["in_band"]]
    agreement = 1.0 - len(outside) / n_decisive if n_decisive else math.nan
    return {"band": width, "band_rule": dict(VERDICT_BAND[precision]), "n_decisive": n_decisive,
            "n_in_band": len(ref_scores) - n_decisive, "flips_outside_band": outside[:20],
            "flips_in_band": [f for f in flips if f["in_band"]][:20], "n_flips_outside_band": len(outside),
            "n_flips_in_band": len(flips) - len(outside), "verdict_agreement": agreement,
            "verdict_agreement_all": float(np.mean([a == b for a, b in zip(ref_v, got_v)])) if ref_v else math.nan,
            "flip_rate_upper95": flip_rate_upper(len(outside), n_decisive)}


def checks(stats: dict[str, Any], precision: str) -> dict[str, bool | None]:
    """Criterion -> passed (None: not applicable to this data, e.g. no anomalous image)."""
    tol, end = TOLERANCES[precision], stats["end"]
    finite = stats["score"]["finite"] and stats["anomaly_map"]["finite"]
    verdicts = {"enough_decisive_images": end["n_decisive"] >= MIN_DECISIVE,
                "verdict_agreement": (end["n_decisive"] > 0
                                      and end["verdict_agreement"] >= tol["min_verdict_agreement"])}
    if precision == "fp32":
        floor = stats.get("fp64", {})
        return {"finite": finite,
                "map_max_abs": stats["anomaly_map"]["max_abs"] <= tol["map_max_abs"] or floor.get("anomaly_map", False),
                "score_max_rel": stats["score"]["max_rel"] <= tol["score_max_rel"] or floor.get("score", False),
                **verdicts}
    lim = tol["max_abs_delta_auroc"]
    d_img, d_pix = end["delta_image_auroc"], end["delta_pixel_auroc"]
    return {"finite": finite,
            # within its tolerance, or moved only by near-ties the band calls noise
            "image_auroc": None if math.isnan(d_img) else (abs(d_img) <= lim
                                                            or end.get("n_pair_swaps_outside_band", 1) == 0),
            "pixel_auroc": None if math.isnan(d_pix) else abs(d_pix) <= lim,
            **verdicts}


def fp64_needed(ref32: np.ndarray, ref64: np.ndarray, output: str) -> bool:
    """Can the FP32 noise-floor rule ever rescue this output? Only where (factor + 1) × PyTorch
    FP32's own error against float64 reaches the plain bound; elsewhere float64 is not stored."""
    tol = TOLERANCES["fp32"]
    diff = np.abs(np.asarray(ref32, np.float64) - np.asarray(ref64, np.float64))
    if output == "score":
        diff = diff / np.maximum(np.abs(np.asarray(ref64, np.float64)), 1e-30)
        bound = tol["score_max_rel"]
    else:
        bound = tol["map_max_abs"]
    return bool((tol["noise_floor_factor"] + 1) * float(diff.max(initial=0.0)) >= bound)
