"""Bundle integrity at its edges, and a malicious ``resume.pt``.

- a file the manifest lists but the folder lacks: refused, naming the file, for the graph and
  for a golden array alike;
- a graph the manifest names but does not checksum (resealed by a knowing forger): refused;
- ``--allow-unverified`` with the graph itself missing: a one-line model error, never a run;
- ``load_resume`` on a pickle payload: refused, and the payload never ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bundles import tiny_bundle
from edgead.core.bundle import BundleError, load_bundle
from edgead.core.manifest import manifest_digest
from edgead.runtime.cli import EXIT_MODEL
from edgead.runtime.cli import main as run_main

GRAPH = "detector.fp32.onnx"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("edges"))


@pytest.fixture()
def bundle(built, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(built, dst, ignore=shutil.ignore_patterns("*.cert.json"))
    return dst


def _reseal(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    data["digest"] = manifest_digest(data)
    path.write_text(json.dumps(data, indent=2))


def _run(bundle: Path, tmp_path: Path, *extra: str) -> int:
    return run_main(["synthetic://washer", "--model", str(bundle), "--frames", "2", "--results",
                     str(tmp_path / "r"), "--headless", "--overwrite", *extra])


def test_the_intact_copy_loads(bundle):
    assert load_bundle(bundle).verified


@pytest.mark.parametrize("rel", [GRAPH, "golden/score.npy", "golden/images.npy"])
def test_a_listed_file_missing_from_the_folder_is_refused(bundle, rel):
    (bundle / rel).unlink()
    with pytest.raises(BundleError, match="missing from the bundle") as err:
        load_bundle(bundle)
    assert rel in str(err.value)


def test_a_graph_absent_from_the_file_list_is_refused(bundle):
    _reseal(bundle, lambda m: m["files"].pop(GRAPH))
    with pytest.raises(BundleError, match="not checksummed") as err:
        load_bundle(bundle)
    assert GRAPH in str(err.value)


def test_a_golden_array_absent_from_the_file_list_is_refused(bundle):
    _reseal(bundle, lambda m: m["files"].pop("golden/score.npy"))
    with pytest.raises(BundleError, match="not checksummed"):
        load_bundle(bundle)


def test_a_file_list_naming_a_file_twice_under_another_name_still_checks_each(bundle):
    (bundle / "golden" / "labels.npy").write_bytes(b"not the labels")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle)


def test_allow_unverified_with_the_graph_missing_is_a_model_error(bundle, tmp_path, capsys):
    (bundle / GRAPH).unlink()
    assert _run(bundle, tmp_path) == EXIT_MODEL
    refused = capsys.readouterr().err
    assert "missing from the bundle" in refused and GRAPH in refused and "--allow-unverified" in refused
    assert _run(bundle, tmp_path, "--allow-unverified") == EXIT_MODEL
    err = capsys.readouterr().err
    assert GRAPH in err and "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists() or \
        json.loads((tmp_path / "r" / "summary.json").read_text())["frames"]["inspected"] == 0


# ------------------------------------------------------------------ resume.pt
class _Payload:
    """Unpickling this calls ``exec``: what a malicious resume.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_malicious_resume_file_is_refused_and_its_payload_never_runs(tmp_path):
    import pickle

    import torch

    from edgead.training.checkpoint import load_resume, save_resume

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "resume.pt"
    torch.save({"epoch": 3, "optimizer": _Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_resume(evil)
    assert not marker.exists(), "the pickle payload ran"
    # the proof that the payload is live: plain pickle loading runs it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    # and a genuine resume file (tensors, dicts, numbers) still loads
    good = tmp_path / "good.pt"
    save_resume(good, {"epoch": 3, "state": {"w": torch.ones(2)}})
    assert load_resume(good)["epoch"] == 3 and not marker.exists()


def test_verify_files_takes_the_raw_manifest_and_names_both_hashes(bundle):
    from edgead.core.bundle import verify_files

    data = json.loads((bundle / "manifest.json").read_text())
    verify_files(bundle, data)  # the raw JSON, typed on the way in
    (bundle / GRAPH).write_bytes(b"tampered")
    with pytest.raises(BundleError) as err:
        verify_files(bundle, data)
    want = data["files"][GRAPH][:12]
    assert f"(manifest {want}…, file " in str(err.value) and "the bundle was modified or corrupted: re-export it" in str(err.value)
    data.pop("golden")
    with pytest.raises(BundleError, match="checksum mismatch"):
        verify_files(bundle, data)
