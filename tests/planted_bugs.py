"""The 17 deliberate bugs of issue 9 that the suite once let through, as text patches.

Each entry: the file, the exact text it holds today, the buggy text, and the tests that must
fail once the bug is planted. ``benchmarks/planted_bugs.py`` plants each one in a scratch copy
of the tree and runs those tests; ``tests/test_planted_bugs.py`` checks, cheaply, that every
``old`` text still occurs exactly once (so a refactor cannot silently retire an entry).

``EXTRA`` holds bugs in defences added since (not in the issue), replayed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    issue: str  # the bug as the issue words it
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


R = "tests/test_references.py::"
C = "tests/test_certifier_fails.py::"
B = "tests/test_bundle_edges.py::"
A = "tests/test_accounting_source.py::"
G = "tests/test_cuda_async.py::"

BUGS: tuple[Bug, ...] = (
    Bug("verdict_at_threshold", "Calibration.verdict with >= for > at the threshold",
        "edgead/core/calibration.py",
        "return NG if raw > self.image_threshold else OK",
        "return NG if raw >= self.image_threshold else OK",
        (R + "test_a_score_exactly_at_the_threshold_is_ok",)),
    Bug("pixel_quantile", "the pixel threshold's quantile 0.999 -> 0.99",
        "edgead/core/calibration.py",
        "pixel_quantile: float = 0.999, sigma: float = DEFAULT_SIGMA) -> Calibration:",
        "pixel_quantile: float = 0.99, sigma: float = DEFAULT_SIGMA) -> Calibration:",
        (R + "test_calibrate_quantiles_with_known_numbers",)),
    Bug("normalize_span", "Calibration.normalize dividing by max instead of max - min",
        "edgead/core/calibration.py",
        "span = max(self.score_max - self.score_min, 1e-12)",
        "span = max(self.score_max, 1e-12)",
        (R + "test_normalize_with_known_numbers",)),
    Bug("parity_any", "the parity pass rule all(checks) -> any(checks)",
        "edgead/certify/parity.py",
        'out["pass"] = all(v for v in results.values() if v is not None)',
        'out["pass"] = any(v for v in results.values() if v is not None)',
        (C + "test_fp32_map_bias_fails_the_map_bound_alone", C + "test_one_nan_fails_as_not_finite")),
    Bug("fp32_bound", "the FP32 bound loosened from 1e-4 to 1e-1",
        "edgead/certify/rules.py",
        '"fp32": {"map_max_abs": 1e-4,',
        '"fp32": {"map_max_abs": 1e-1,',
        (C + "test_fp32_map_bias_fails_the_map_bound_alone",)),
    Bug("certificate_other_precision",
        "a passing certificate of another backend or precision accepted (the lookup globs every certificate)",
        "edgead/certify/certificate.py",
        'return sorted(stem.parent.glob(f"{stem.name}.{backend}.*{SUFFIX}"))',
        'return sorted(stem.parent.glob(f"*{SUFFIX}"))',
        (C + "test_a_certificate_lists_only_its_own_precision_and_backend",)),
    Bug("unchecksummed_graph", "verify_files skipping its 'graph not checksummed' check",
        "edgead/core/bundle.py",
        "if rel not in files:",
        "if False:",
        (B + "test_a_graph_absent_from_the_file_list_is_refused",)),
    Bug("missing_file_continue", "verify_files: continue on a missing file",
        "edgead/core/bundle.py",
        'raise BundleError(f"{file}: missing from the bundle")',
        "continue",
        (B + "test_a_listed_file_missing_from_the_folder_is_refused",)),
    Bug("ssim_cov", "the SSIM map with cov for 2*cov",
        "edgead/models/scorers.py",
        "num = (2 * mu_a * mu_b + self.c1) * (2 * cov + self.c2)",
        "num = (2 * mu_a * mu_b + self.c1) * (cov + self.c2)",
        (R + "test_ssim_map_matches_scikit_image",)),
    Bug("gaussian_by_max", "the Gaussian window normalised by its max",
        "edgead/models/scorers.py",
        "return g / g.sum()",
        "return g / g.max()",
        (R + "test_ssim_window_is_the_normalised_gaussian", R + "test_ssim_map_matches_scikit_image")),
    Bug("topk_is_mean", "top_k_mean replaced by the mean of the whole map",
        "edgead/models/heads.py",
        "return flat.topk(k, dim=1).values.mean(dim=1)",
        "return flat.mean(dim=1)",
        (R + "test_top_k_mean_against_a_numpy_sort",)),
    Bug("record_skips_errors", "RunStats.record not counting ERROR frames",
        "edgead/runtime/stats.py",
        "            if verdict == ERROR:\n                self.errored += 1",
        "            if verdict == ERROR:\n                pass",
        (A + "test_record_counts_each_verdict_where_it_lands",
         A + "test_error_frames_are_counted_as_errored_and_nothing_is_settled")),
    Bug("settle_lost_disabled", "Pipeline._settle_lost disabled",
        "edgead/runtime/pipeline.py",
        "        if lost > 0:\n            s.errored += lost",
        "        if False:\n            s.errored += lost",
        (A + "test_a_crashed_stage_still_balances_through_a_lost_frames_event",)),
    Bug("one_frame_in_flight", "the pipeline's infer stage never keeping two frames in flight",
        "edgead/runtime/pipeline.py",
        "if self.sync_engine or len(inflight) >= self.num_slots or self.q_ready.empty():",
        "if self.sync_engine or len(inflight) >= 1 or self.q_ready.empty():",
        (A + "test_an_asynchronous_engine_gets_two_frames_in_flight",)),
    Bug("resume_pickle", "load_resume with weights_only=False",
        "edgead/training/checkpoint.py",
        'return torch.load(path, map_location="cpu", weights_only=True)',
        'return torch.load(path, map_location="cpu", weights_only=False)',
        (B + "test_a_malicious_resume_file_is_refused_and_its_payload_never_runs",)),
    Bug("wait_without_synchronize", "CudaSlots.wait without a stream synchronize",
        "edgead/engines/cuda_rt.py",
        "        s.stream.synchronize()\n        s.pending = False",
        "        s.pending = False",
        (G + "test_results_are_read_only_after_the_stream_is_synchronised",
         G + "test_run_returns_this_frames_result_not_the_previous_one")),
    Bug("close_with_queued_work", "CudaSlots.close freeing memory with work still queued",
        "edgead/engines/cuda_rt.py",
        "            if s.stream.raw is not None:\n                try:\n                    s.stream.synchronize()",
        "            if False:\n                try:\n                    s.stream.synchronize()",
        (G + "test_close_with_work_queued_waits_before_freeing",)),
)

EXTRA: tuple[Bug, ...] = (
    Bug("certificate_body_unchecked",
        "(new defence) a certificate's sealed backend/precision/graph not compared with the engine's",
        "edgead/certify/certificate.py",
        "    if made_for != wanted:\n",
        "    if False:\n",
        (C + "test_a_passing_certificate_of_another_precision_does_not_unlock_an_engine",)),
    Bug("bf16_island_unchecked",
        "(new defence) OpenVINO BF16: an FP32 island op the plugin runs in BF16 not refused",
        "edgead/engines/openvino_engine.py",
        "        if not all(_split_off(n, allowed) for n in origins):",
        "        if False:",
        ("tests/test_openvino_bf16.py::test_a_graph_whose_island_openvino_runs_in_bf16_is_refused",)),
    Bug("bf16_islands_unmarked", "(new defence) OpenVINO BF16: the FP32 islands not marked precise",
        "edgead/engines/openvino_engine.py",
        "    if html.unescape(layer.group(1)) not in names:",
        "    if True:",
        ("tests/test_openvino_bf16.py::test_precise_islands_run_fp32_and_the_rest_bf16",)),
    Bug("openvino_signal_stack_left", "(new defence) OpenVINO's alternate signal stack left on the compiling thread",
        "edgead/engines/openvino_engine.py",
        "        with thread_signal_stack_kept():  # the plugin leaves its own on this thread (see there)",
        "        with contextlib.nullcontext():",
        ("tests/test_openvino_bf16.py::test_a_signal_after_openvino_engines_is_handled_not_a_crash",)),
)
