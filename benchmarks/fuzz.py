"""Fuzz what a station is fed: image files, image folders and bundle manifests, mutated by hypothesis.

    python -m benchmarks.fuzz --model BUNDLE [--images 2000] [--folders 200] [--manifests 1000]
                              [--out results/fuzz_cpu.json]

Every case runs the real thing: a folder source, the guards and the bundle's ONNX Runtime engine
through the station pipeline (images, folders), or ``edgead.core.bundle.load_bundle`` (manifests).

Oracles:
- image files and folders: no stage crashes, every file is one captured frame, the books balance,
  an ERROR names its reason and its file, and a frame gets an OK/NG verdict only if it decoded to
  pixels; a PNG (CRC-checked chunks) gets one only if its pixels are the original's. JPEG, BMP,
  TIFF and WebP carry no checksum: a flipped byte there can decode to a damaged picture that no
  file check can tell from a real one; those cases are counted ("decoded, damaged"), not failed.
- manifests: ``load_bundle`` either returns a bundle whose detector, input shape and calibration
  can be read, or raises ``BundleError``. Any other exception is a violation (the typed manifest of
  issue 14 is meant to remove them).

The counts of cases tried and of violations go to the JSON, with the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edgead.core.machine import describe
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.sources import InputOptions, open_source

FORMATS = (".png", ".jpg", ".bmp", ".tif", ".webp")
CHECKED = {".png"}  # formats whose decoder checks integrity (CRC per chunk, Adler-32 of the pixels)


def base_images(size: int = 48, image: np.ndarray | None = None) -> dict[str, tuple[bytes, np.ndarray]]:
    """One encoded image per format and the pixels it decodes to: ``image`` (a good part, so the
    intact file gets its OK), or random pixels."""
    if image is None:
        image = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
    out = {}
    for ext in FORMATS:
        ok, buf = cv2.imencode(ext, image)
        assert ok, ext
        out[ext] = (buf.tobytes(), cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
    return out


# -- mutations -----------------------------------------------------------------------------------

@st.composite
def mutated(draw: Any, data: bytes) -> bytes:
    """``data`` truncated, bit-flipped, spliced with junk, its header wiped, or replaced."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "wipe_header", "replace", "empty"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if kind == "flip":
        out = bytearray(data)
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8)):
            out[pos] ^= mask
        return bytes(out)
    if kind == "splice":
        pos = draw(st.integers(0, n))
        return data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos + draw(st.integers(0, 64)):]
    if kind == "wipe_header":
        k = draw(st.integers(1, min(64, n)))
        return bytes(k) + data[k:]
    if kind == "replace":
        return draw(st.binary(min_size=1, max_size=4096))
    return b""


def image_cases(bases: dict[str, tuple[bytes, np.ndarray]]) -> st.SearchStrategy:
    return st.sampled_from(sorted(bases)).flatmap(lambda ext: st.tuples(st.just(ext), mutated(bases[ext][0])))


# -- running a folder through the station pipeline -----------------------------------------------

class Station:
    """The pipeline over a folder, with a real engine, opened once."""

    def __init__(self, bundle: Any, engine: Any) -> None:
        self.bundle, self.engine = bundle, engine
        self.post = Postprocessor(bundle.calibration)

    def run(self, folder: Path) -> tuple[Any, list[dict[str, Any]]]:
        log_path = folder.parent / f"{folder.name}.jsonl"
        log = JsonlLog(log_path)
        source = open_source(str(folder), InputOptions(default_size=int(self.bundle.input_shape[-1])))
        source.open()
        result = Pipeline(source, self.engine, self.post, [], log, PipelineConfig(policy="block")).run()
        log.close()
        rows = [json.loads(line) for line in log_path.read_text().splitlines()]
        return result, [r for r in rows if "verdict" in r]

    def run_one(self, tmp: Path, ext: str, payload: bytes) -> str:
        folder = tmp / f"one{time.monotonic_ns()}"
        folder.mkdir()
        (folder / f"part{ext}").write_bytes(payload)
        return self.run(folder)[1][0]["verdict"]


def check_run(result: Any, rows: list[dict[str, Any]], files: list[Path]) -> list[str]:
    """Violations of the folder oracle (empty when the run is as it must be)."""
    bad = []
    f = result.summary["frames"]
    if result.fatal:
        bad.append(f"a stage crashed: {result.fatal}")
    if not result.summary["balanced"] or f["captured"] != len(files) or len(rows) != len(files):
        bad.append(f"not every file is one frame: {f} for {len(files)} files")
    for row, path in zip(rows, files):
        if row.get("source") != str(path):
            bad.append(f"frame {row['frame']} names {row.get('source')}, expected {path}")
        if row["verdict"] == "ERROR" and not row.get("error"):
            bad.append(f"{path}: ERROR without a reason")
    return bad


def image_verdict(station: Station, bases: dict, ext: str, payload: bytes, tmp: Path) -> tuple[str, list[str]]:
    """(outcome, violations) of one mutated image file."""
    folder = tmp / f"case{time.monotonic_ns()}"
    folder.mkdir()
    path = folder / f"part{ext}"
    path.write_bytes(payload)
    result, rows = station.run(folder)
    bad = check_run(result, rows, [path])
    if bad:
        return "violation", bad
    verdict = rows[0]["verdict"]
    if verdict == "ERROR":
        return "error", []
    decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED) if payload else None
    intact = decoded is not None and decoded.shape == bases[ext][1].shape and np.array_equal(decoded, bases[ext][1])
    if intact:
        return "decoded, intact", []
    if ext in CHECKED:
        return "violation", [f"{ext}: damaged pixels passed the decoder and got {verdict}"]
    return f"decoded, damaged ({ext}): {verdict}", []


FOLDER_ENTRIES = ("good_png", "good_jpg", "empty", "junk", "truncated_png", "dir_named_png", "broken_link",
                  "not_an_image_ext", "one_pixel", "sliver")
BAD_ENTRIES = {"empty", "junk", "truncated_png", "dir_named_png", "broken_link", "one_pixel", "sliver"}


def make_folder(folder: Path, kinds: list[str], bases: dict) -> list[tuple[Path, str]]:
    """Entries of the given kinds, named so that sorting keeps their order; returns the image files."""
    folder.mkdir()
    files = []
    for i, kind in enumerate(kinds):
        stem = folder / f"{i:03d}_{kind}"
        path = stem.with_suffix(".txt" if kind == "not_an_image_ext" else (".jpg" if kind == "good_jpg" else ".png"))
        if kind in ("good_png", "good_jpg"):
            path.write_bytes(bases[path.suffix][0])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "junk":
            path.write_bytes(b"\x89PNG not really")
        elif kind == "truncated_png":
            path.write_bytes(bases[".png"][0][:200])
        elif kind == "dir_named_png":
            path.mkdir()
        elif kind == "broken_link":
            path.symlink_to(folder / "nowhere.png")
        elif kind == "one_pixel":
            cv2.imwrite(str(path), np.zeros((1, 1, 3), np.uint8))
        elif kind == "sliver":
            cv2.imwrite(str(path), np.zeros((2, 300, 3), np.uint8))
        else:
            path.write_text("notes")
        if kind != "not_an_image_ext":
            files.append((path, kind))
    return files


def folder_verdict(station: Station, kinds: list[str], bases: dict, tmp: Path) -> tuple[str, list[str]]:
    files = make_folder(tmp / f"folder{time.monotonic_ns()}", kinds, bases)
    if not files:
        return "no images", []
    result, rows = station.run(files[0][0].parent)
    bad = check_run(result, rows, [p for p, _ in files])
    for row, (path, kind) in zip(rows, files):
        if kind in BAD_ENTRIES and row["verdict"] != "ERROR":
            bad.append(f"{path.name} ({kind}) got {row['verdict']}")
        if kind not in BAD_ENTRIES and row["verdict"] == "ERROR":
            bad.append(f"{path.name} ({kind}) is a good image but got ERROR: {row.get('error')}")
    return ("violation" if bad else "ok"), bad


# -- manifests -----------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)


@st.composite
def mutated_manifest(draw: Any, manifest: dict[str, Any]) -> bytes:
    """The manifest with a key removed or retyped (at depth 1 or 2), or its bytes mutated."""
    kind = draw(st.sampled_from(["drop", "retype", "retype_nested", "bytes", "whole"]))
    if kind == "bytes":
        return draw(mutated(json.dumps(manifest).encode()))
    if kind == "whole":
        return json.dumps(draw(JSON_VALUE)).encode()
    m = json.loads(json.dumps(manifest))
    key = draw(st.sampled_from(sorted(m)))
    if kind == "drop":
        del m[key]
    elif kind == "retype" or not isinstance(m[key], dict) or not m[key]:
        m[key] = draw(JSON_VALUE)
    else:
        sub = draw(st.sampled_from(sorted(m[key])))
        m[key][sub] = draw(JSON_VALUE)
    return json.dumps(m).encode()


def manifest_verdict(bundle_dir: Path, original: bytes, payload: bytes) -> tuple[str, list[str]]:
    from edgead.core.bundle import BundleError, load_bundle

    (bundle_dir / "manifest.json").write_bytes(payload)
    try:
        bundle = load_bundle(bundle_dir)
        _ = (bundle.detector, bundle.input_shape, bundle.calibration)
        outcome, bad = "loaded", []
    except BundleError:
        outcome, bad = "refused (BundleError)", []
    except Exception as exc:  # noqa: BLE001 - what the oracle is looking for
        outcome, bad = "violation", [f"{type(exc).__name__}: {str(exc)[:120]}"]
    finally:
        (bundle_dir / "manifest.json").write_bytes(original)
    return outcome, bad


# -- the driver ----------------------------------------------------------------------------------

def fuzz(name: str, strategy: st.SearchStrategy, check, n: int, tally: dict[str, Any]) -> None:
    """Run ``check(case) -> (outcome, violations)`` on ``n`` hypothesis cases; count, never stop."""
    if n <= 0:
        return
    outcomes: Counter = Counter()
    violations: list[str] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(case):
        outcome, bad = check(case)
        outcomes[outcome] += 1
        violations.extend(bad)

    started = time.monotonic()
    one()
    tally[name] = {"cases": sum(outcomes.values()), "outcomes": dict(outcomes), "violations": len(violations),
                   "violation_examples": sorted(set(violations))[:10], "wall_s": round(time.monotonic() - started, 1)}
    print(f"{name}: {tally[name]['cases']} cases, {dict(outcomes)}, violations {len(violations)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from edgead.runtime.infer import load_checked_bundle, open_bundle_engine

    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle to run the frames through")
    p.add_argument("--images", type=int, default=2000, help="mutated image files")
    p.add_argument("--folders", type=int, default=200, help="folders of good and bad entries")
    p.add_argument("--manifests", type=int, default=1000, help="mutated bundle manifests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--category", default="metal", help="synthetic category of the good part that is mutated")
    p.add_argument("--out", default="results/fuzz_cpu.json")
    args = p.parse_args(argv)

    bundle = load_checked_bundle(args.model, "onnxruntime", "fp32", allow_unverified=True, warn=print)
    engine = open_bundle_engine(bundle, "onnxruntime", "fp32", args.threads)
    from edgead.data.synth import Conveyor

    part = Conveyor(args.category, size=int(bundle.input_shape[-1]), seed=1, defect_rate=0.0)[0][0]
    station, bases, tally = Station(bundle, engine), base_images(image=part), {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        intact = {ext: station.run_one(tmp, ext, data) for ext, (data, _) in bases.items()}
        print(f"the unmutated good part ({args.category}) gets: {intact}")
        fuzz("image_files", image_cases(bases), lambda c: image_verdict(station, bases, c[0], c[1], tmp),
             args.images, tally)
        kinds = st.lists(st.sampled_from(FOLDER_ENTRIES), min_size=1, max_size=12)
        fuzz("folders", kinds, lambda k: folder_verdict(station, k, bases, tmp), args.folders, tally)
        copy = tmp / "bundle"
        shutil.copytree(bundle.root, copy)
        original = (copy / "manifest.json").read_bytes()
        fuzz("manifests", mutated_manifest(json.loads(original)),
             lambda payload: manifest_verdict(copy, original, payload), args.manifests, tally)
    engine.close()
    out = {"machine": describe(), "model": str(bundle.root), "tool": "hypothesis", "base_part": args.category,
           "base_verdicts": intact, "results": tally,
           "total_cases": sum(t["cases"] for t in tally.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {out['total_cases']} cases; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
