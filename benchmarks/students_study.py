"""Uninformed Students' training choices, taken on the normal validation split only.

    python -m benchmarks.students_study --categories metal --variants one_scale one_scale_crop64_share25 \
        --budget-s 300 --out results/students_study.json

Each variant (``VARIANTS``, on top of the quality run's CPU settings) trains with ``edgead train``'s
trainer under a CPU-time budget, and is scored on the validation images against the PatchCore
study's proxies (CutPaste, CutPaste-scar, three thin-line copies), as ``benchmarks.distilled_study``
scores its students. No test image is read.
"""

from __future__ import annotations

from typing import Any

from benchmarks.quality import CPU_OVERRIDES

EFFICIENTAD = {"hard_fraction": 0.001, "penalty_weight": 1.0}  # p_hard 0.999; the penalty's weight 1
CHANNEL = {"target_scaling": "channel"}  # the teacher's targets before 2026-12-03
CROP = {"patch_sizes": (33,), "student_crop": 64, "teacher_budget_share": 0.25}
VARIANTS: dict[str, dict[str, Any]] = {
    "quality": {},  # what benchmarks.quality trains
    "channel_targets": CHANNEL,
    "hard_channel": {**CHANNEL, "hard_fraction": 0.001},
    "penalty_channel": {**CHANNEL, "penalty_weight": 1.0},
    "hard_penalty_channel": {**CHANNEL, **EFFICIENTAD},
    "one_scale_hard_penalty_channel": {**CHANNEL, "patch_sizes": (33,), **EFFICIENTAD},
    "one_scale": {"patch_sizes": (33,)},
    "one_scale_crop64_share25": CROP,
    "one_scale_crop64_share25_hard_penalty": {**CROP, **EFFICIENTAD},
}


def variant_config(name: str) -> dict[str, Any]:
    return {**CPU_OVERRIDES["students"], **VARIANTS[name]}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.distilled_study import study_main

    return study_main(argv, doc=__doc__ or "", model="students", variants=VARIANTS, default="quality",
                      config_of=variant_config, prefix="edgead-students-", out="results/students_study.json")


if __name__ == "__main__":
    raise SystemExit(main())
