"""Tamper evidence: the manifest is covered like the graphs, hand edits are refused by
``edgead-run`` and by certification, the typed manifest gives clear errors, and signatures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgead.core.bundle import BundleError, load_bundle
from edgead.core.manifest import manifest_digest
from edgead.runtime.cli import main as run_main

pytest.importorskip("cryptography")


def fresh(station: dict, tmp_path: Path, name: str = "bundle") -> Path:
    dst = tmp_path / name
    shutil.copytree(station["bundle"], dst, ignore=shutil.ignore_patterns("*.cert.json", "signature.json"))
    return dst


def edit(bundle: Path, change, reseal: bool = False) -> None:
    """Edit manifest.json by hand (``reseal``: and recompute its digest, as a knowing forger would)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    if reseal:
        data["digest"] = manifest_digest(data)
    path.write_text(json.dumps(data, indent=2))


def args(bundle: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["synthetic://washer", "--model", str(bundle), "--frames", "3", "--results", str(tmp_path / "r"),
            "--headless", "--overwrite", *extra]


def parity(bundle: Path) -> int:
    from edgead.bench import parity_main

    return parity_main([str(bundle), "--precision", "fp32"])


def set_threshold(value):
    return lambda m: m["calibration"].update(image_threshold=value)


# -- the manifest is covered ---------------------------------------------------------------------

def test_threshold_edited_to_99_is_refused_by_the_runtime_and_by_certification(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    assert run_main(args(bundle, tmp_path)) == 0  # intact: certifies and runs
    edit(bundle, set_threshold(99.0))
    capsys.readouterr()
    assert run_main(args(bundle, tmp_path)) == 4
    err = capsys.readouterr().err
    assert "manifest.json: checksum mismatch of the manifest itself" in err and "edited after export" in err
    assert parity(bundle) == 2  # re-certifying an edited bundle does not bless it
    assert "checksum mismatch" in capsys.readouterr().err
    # --allow-unverified overrides checksums, never a threshold no calibration can produce
    assert run_main(args(bundle, tmp_path, "--allow-unverified")) == 4
    assert "outside the validation scores" in capsys.readouterr().err
    # nor does recomputing the digest
    edit(bundle, lambda m: None, reseal=True)
    assert run_main(args(bundle, tmp_path)) == 4 and parity(bundle) == 2
    assert "outside the validation scores" in capsys.readouterr().err


def test_nan_threshold_is_refused(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    edit(bundle, set_threshold(float("nan")))  # json writes NaN
    assert "NaN" in (bundle / "manifest.json").read_text()
    for extra in ((), ("--allow-unverified",)):
        assert run_main(args(bundle, tmp_path, *extra)) == 4
        assert "NaN" in capsys.readouterr().err
    with pytest.raises(BundleError, match="NaN"):
        load_bundle(bundle, verify=False)


def test_certificate_written_into_the_manifest_by_hand_changes_nothing(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    edit(bundle, lambda m: m.update(parity={"onnxruntime/fp32": {"pass": True}}), reseal=True)
    # the old layout's certificate is just an unknown key now: this device still has none
    assert run_main(args(bundle, tmp_path, "--no-certify")) == 4
    assert "no parity certificate" in capsys.readouterr().err


def test_an_edited_golden_output_is_refused(station, tmp_path):
    bundle = fresh(station, tmp_path)
    score = bundle / "golden" / "score.npy"
    score.write_bytes(score.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="golden/score.npy: checksum mismatch"):
        load_bundle(bundle)
    assert parity(bundle) == 2


def test_extra_files_do_not_break_the_bundle_but_cannot_enter_it(station, tmp_path):
    bundle = fresh(station, tmp_path)
    (bundle / "detector.fp32.trt-cache.engine").write_bytes(b"plan")  # what a station leaves beside the graphs
    b = load_bundle(bundle)
    assert "detector.fp32.trt-cache.engine" not in b.spec.files


# -- the typed manifest --------------------------------------------------------------------------

def test_missing_input_key_is_a_clear_error_not_a_keyerror(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    edit(bundle, lambda m: m.pop("input"), reseal=True)
    with pytest.raises(BundleError, match=r"manifest.json: missing key 'input'.*re-export"):
        load_bundle(bundle)
    assert run_main(args(bundle, tmp_path)) == 4
    assert "missing key 'input'" in capsys.readouterr().err
    edit(bundle, lambda m: m.update(input={"name": "image", "shape": [1, 3, 32]}), reseal=True)
    with pytest.raises(BundleError, match="input.shape must be"):
        load_bundle(bundle)


def test_schema_1_bundle_is_refused_with_a_reexport_message(station, tmp_path):
    bundle = fresh(station, tmp_path)

    def to_v1(m):
        m["schema"] = 1
        m["postprocess"] = {"sigma": m["calibration"].pop("sigma")}
        m["parity"] = {"onnxruntime/fp32": {"pass": True}}
        m.pop("digest")

    edit(bundle, to_v1)
    with pytest.raises(BundleError, match=r"schema 1, this edgead reads schema 2 .*postprocess.*re-export"):
        load_bundle(bundle)


def test_manifest_round_trips_through_the_typed_form(station):
    from edgead.core.manifest import Manifest

    b = load_bundle(station["bundle"])
    again = Manifest.from_dict(b.spec.to_dict())
    assert again == b.spec and manifest_digest(again.to_dict()) == b.digest
    assert b.calibration.sigma > 0 and b.input_shape == (1, 3, 32, 32)


# -- signatures ----------------------------------------------------------------------------------

def test_signing_round_trip_and_wrong_key(station, tmp_path, capsys):
    from edgead.cli import main as edgead_main
    from edgead.core.signing import sign_bundle

    keys = tmp_path / "keys"
    assert edgead_main(["keygen", "--out", str(keys / "line1")]) == 0
    assert edgead_main(["keygen", "--out", str(keys / "intruder")]) == 0
    assert edgead_main(["keygen", "--out", str(keys / "line1")]) == 2  # never overwritten
    assert (keys / "line1.key").stat().st_mode & 0o077 == 0  # private key: owner only
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "line1.pub", trusted)

    signed = fresh(station, tmp_path, "signed")
    sign_bundle(signed, keys / "line1.key")
    assert run_main(args(signed, tmp_path, "--trust", str(keys / "line1.pub"))) == 0
    assert run_main(args(signed, tmp_path, "--trust", str(trusted))) == 0  # a folder of trusted keys
    capsys.readouterr()

    assert run_main(args(signed, tmp_path, "--trust", str(keys / "intruder.pub"))) == 4
    assert "not trusted" in capsys.readouterr().err
    unsigned = fresh(station, tmp_path, "unsigned")
    assert run_main(args(unsigned, tmp_path, "--trust", str(trusted), "--allow-unverified")) == 4
    assert "unsigned" in capsys.readouterr().err
    forged = fresh(station, tmp_path, "forged")
    sign_bundle(forged, keys / "intruder.key")
    assert run_main(args(forged, tmp_path, "--trust", str(trusted))) == 4
    assert "not trusted" in capsys.readouterr().err

    # a knowing forger moves the threshold inside the validation range and reseals the digest:
    # only the signature catches that
    low = load_bundle(signed).calibration.score_min
    edit(signed, set_threshold(low), reseal=True)
    assert run_main(args(signed, tmp_path, "--trust", str(trusted))) == 4
    assert "changed after it was signed" in capsys.readouterr().err


def test_export_signs_with_sign_key(station, tmp_path, capsys):
    from edgead.core.signing import keygen

    private, public = keygen(tmp_path / "k")
    run = tmp_path / "run"
    # a quick fp32 export of a fresh tiny run
    import numpy as np

    from edgead.core.calibration import calibrate
    from edgead.export.bundle_writer import main as export_main
    from edgead.models import registry
    from edgead.training.checkpoint import save_run

    detector = registry.create("ssim_ae", image_size=32, width=8, latent_dim=16).eval()
    rng = np.random.default_rng(0)
    save_run(run, detector, {"data": {"layout": "synthetic", "category": "washer"}},
             calibrate(rng.random(8), rng.random((8, 32, 32))))
    assert export_main([str(run), "--out", str(tmp_path / "b"), "--sign", str(private), "--golden-count", "40"]) == 0
    out = capsys.readouterr().out
    assert "golden outputs: 40 images (8 normal: synthetic washer validation stream" in out and "signed" in out
    signature = json.loads((tmp_path / "b" / "signature.json").read_text())
    assert signature["manifest_digest"] == load_bundle(tmp_path / "b").digest
    from edgead.core.signing import trusted_keys, verify_signature

    assert verify_signature(tmp_path / "b", signature["manifest_digest"], trusted_keys(public)) == signature["key_id"]
