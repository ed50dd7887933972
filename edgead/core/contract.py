"""Names every layer agrees on: the graph's I/O tensors and the verdicts.

Every graph (PyTorch, ONNX, each engine) takes ``image`` (B, C, H, W) float32 in [0, 1] and
returns ``score`` (B,) and ``anomaly_map`` (B, 1, H, W). A verdict is ``OK``, ``NG`` or ``ERROR``;
an ERROR is never an OK.
"""

from __future__ import annotations

IMAGE = "image"
SCORE = "score"
ANOMALY_MAP = "anomaly_map"
OUTPUT_NAMES = (SCORE, ANOMALY_MAP)
# The optional post-processing on the engine (``edgead export --postprocess``): the map smoothed
# with the calibration's sigma (raw units, what regions threshold), the normalised score and map.
SMOOTHED_MAP, SCORE_NORM, MAP_NORM = "smoothed_map", "score_norm", "map_norm"
POSTPROCESS_OUTPUTS = (SMOOTHED_MAP, SCORE_NORM, MAP_NORM)
POSTPROCESS_GRAPH = "detector_post"  # the fused detector + post-processing graph

# Modules whose scope path holds this stay FP32 in every reduced-precision engine (input
# normalisation, distance reductions, scorers): the FP16 and INT8 exports and OpenVINO's BF16 read it.
FP32_SCOPE = "/fp32_"

OK, NG, ERROR = "OK", "NG", "ERROR"
VERDICTS = (OK, NG, ERROR)
