"""Runs on disk: safetensors weights + JSON, never pickle.

``runs/NAME/``
    ``config.json``       detector name, its config, training settings, data source
    ``model.safetensors`` the weights selected on the validation split
    ``calibration.json``  thresholds from the validation split (see :mod:`edgead.core.calibration`)
    ``history.json``      losses and validation objective per epoch
    ``resume.pt``         optimiser state for ``--resume``; loaded with ``weights_only=True``
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgead.core.calibration import Calibration
from edgead.models import registry
from edgead.models.base import Detector

CONFIG, WEIGHTS, CALIBRATION, HISTORY, RESUME = (
    "config.json", "model.safetensors", "calibration.json", "history.json", "resume.pt")


class CheckpointError(ValueError):
    """A run directory or weight file is missing, malformed or unsafe; the message names the file."""


def _refuse_pickle(path: Path) -> None:
    """safetensors files start with an 8-byte little-endian header length, then JSON ``{``.

    A pickle starts with the PROTO opcode (0x80, then a protocol 2-5) and torch.save writes a zip
    of pickles. The header length may itself begin with 0x80, so the JSON brace decides first.
    """
    head = path.read_bytes()[:16]
    if len(head) >= 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):
        return
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: is a pickle/torch.save payload; edgead only loads safetensors "
                              "(pickle can run arbitrary code)")
    raise CheckpointError(f"{path}: not a safetensors file")


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    _refuse_pickle(path)
    state = load_file(str(path))
    if isinstance(module, Detector):
        state = module.upgrade_state_dict(state)  # a run saved under older module names
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights don't match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def save_run(run_dir: str | Path, detector: Detector, meta: dict[str, Any],
             calibration: Calibration | None = None) -> Path:
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_weights(detector, root / WEIGHTS)
    config = {"detector": detector.name, "config": detector.config.to_dict(), **meta}
    (root / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if calibration is not None:
        (root / CALIBRATION).write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    return root


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{Path(run_dir)}: not a training run (no {CONFIG}); train one with `edgead train`")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, Calibration | None, dict[str, Any]]:
    """Rebuild the detector of a run, load its weights and calibration; returns (detector, calibration, config)."""
    root = Path(run_dir)
    meta = read_run_config(root)
    detector = _create_for_loading(meta)
    load_weights(detector, root / WEIGHTS)
    calib_path = root / CALIBRATION
    calibration = Calibration.from_dict(json.loads(calib_path.read_text())) if calib_path.is_file() else None
    return detector.to(device).eval(), calibration, meta


def _create_for_loading(meta: dict[str, Any]) -> Detector:
    """Rebuild a run's detector. The VGG scorer's weights are in the run's own safetensors, so a
    run trained with ``--vgg-weights FILE`` loads on a machine that lacks FILE."""
    from edgead.models.vgg_weights import VGGWeightsError

    detector_cls, _ = registry.get(meta["detector"])
    config = {**detector_cls.legacy_config, **meta["config"]}  # fields added since the run was saved
    try:
        return registry.create(meta["detector"], **config)
    except VGGWeightsError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random init is overwritten by the run's weights
            return registry.create(meta["detector"], **{**config, "vgg_weights": None})


def save_resume(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_resume(path: Path) -> dict[str, Any]:
    # weights_only=True: tensors, dicts and numbers only, no arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)
