"""``edgead export --postprocess``: the detector graph with the runtime's post-processing appended.

For every precision of the fused graph, ``detector_post.<precision>.onnx`` chains it with the
post-processing component (:mod:`edgead.models.postprocess_graph`, always FP32: it is all
smoothing and normalisation), through the same graph assembler as the mixed-precision INT8
graph. Its outputs are the raw ``score`` and ``anomaly_map`` (what certification compares with
PyTorch) plus ``smoothed_map``, ``score_norm`` and ``map_norm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from edgead.core.bundle import FUSED
from edgead.core.calibration import Calibration
from edgead.core.contract import ANOMALY_MAP, IMAGE, OUTPUT_NAMES, POSTPROCESS_GRAPH, POSTPROCESS_OUTPUTS, SCORE
from edgead.export.onnx_export import chain_graphs, export_onnx
from edgead.models.postprocess_graph import POSTPROCESS, PostprocessGraph


def export_postprocess(out: Path, calibration: Calibration, shapes: dict[str, Any],
                       graphs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Write the post-processing component and ``detector_post`` per precision into ``graphs``;
    returns the manifest's ``postprocess`` entry."""
    height, width = shapes[ANOMALY_MAP][-2:]
    module = PostprocessGraph(calibration, int(height), int(width)).eval()
    examples = [torch.rand(tuple(shapes[SCORE])), torch.rand(tuple(shapes[ANOMALY_MAP]))]
    name = f"{POSTPROCESS}.fp32.onnx"
    post = export_onnx(module, examples, (SCORE, ANOMALY_MAP), POSTPROCESS_OUTPUTS, out / name)
    graphs[POSTPROCESS] = {"fp32": name}
    graphs[POSTPROCESS_GRAPH] = {}
    for precision, detector_file in graphs[FUSED].items():
        fused = chain_graphs([(FUSED, onnx.load(str(out / detector_file))), (POSTPROCESS, post)], [IMAGE],
                             [*OUTPUT_NAMES, *POSTPROCESS_OUTPUTS])
        file = f"{POSTPROCESS_GRAPH}.{precision}.onnx"
        onnx.save(fused, str(out / file))
        graphs[POSTPROCESS_GRAPH][precision] = file
    return {"graph": POSTPROCESS_GRAPH, "outputs": list(POSTPROCESS_OUTPUTS), "sigma": calibration.sigma,
            "smoothing": "separable Gaussian, cv2.getGaussianKernel taps, BORDER_REFLECT (FP32)",
            "normalisation": "Calibration.normalize (score), Calibration.normalize_map (map)"}
