"""Fuzzing (hypothesis) of what a station is fed, with the real small bundle and ONNX Runtime: mutated
image files and folders of good and bad entries always end in an ERROR verdict with its reason or
a verdict on real pixels, never a crash; mutated manifests (retyped, missing or
extra keys, damaged bytes) load or are refused with a BundleError, never another exception. The oracles live in benchmarks/fuzz.py, which runs many more cases."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz import (FOLDER_ENTRIES, Station, base_images, folder_verdict, image_cases, image_verdict,
                             manifest_verdict, mutated_manifest)
from test_runtime_e2e import bundle  # noqa: F401 - the bundle fixture

BASES = base_images()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def station(bundle):  # noqa: F811
    from edgead.core.bundle import load_bundle
    from edgead.runtime.infer import open_bundle_engine

    b = load_bundle(bundle)
    engine = open_bundle_engine(b, "onnxruntime", "fp32", threads=1)
    yield Station(b, engine)
    engine.close()


@FUZZ
@given(case=image_cases(BASES))
@example(case=(".png", b""))
@example(case=(".png", BASES[".png"][0][:-20]))
@example(case=(".jpg", BASES[".jpg"][0][: len(BASES[".jpg"][0]) // 2]))
def test_mutated_image_file_is_an_error_or_a_verdict_on_real_pixels(station, case):
    ext, payload = case
    with tempfile.TemporaryDirectory() as tmp:
        outcome, violations = image_verdict(station, BASES, ext, payload, Path(tmp))
    assert not violations, violations
    assert outcome in ("error", "decoded, intact") or outcome.startswith("decoded, damaged")
    if ext == ".png":
        assert not outcome.startswith("decoded, damaged")


@FUZZ
@given(kinds=st.lists(st.sampled_from(FOLDER_ENTRIES), min_size=1, max_size=10))
def test_folder_of_good_and_bad_entries_accounts_for_every_file(station, kinds):
    with tempfile.TemporaryDirectory() as tmp:
        outcome, violations = folder_verdict(station, kinds, BASES, Path(tmp))
    assert not violations, violations


@pytest.fixture(scope="module")
def bundle_copy(bundle, tmp_path_factory):  # noqa: F811
    dst = tmp_path_factory.mktemp("fuzz_bundle") / "bundle"
    shutil.copytree(bundle, dst)
    return dst, (dst / "manifest.json").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_manifest_is_loaded_or_refused_with_a_bundle_error(bundle_copy, data):
    root, original = bundle_copy
    manifest = json.loads(original)
    payload = data.draw(mutated_manifest(manifest))
    outcome, violations = manifest_verdict(root, original, payload)
    assert not violations, violations
