"""What the validation studies share: their data arguments and the synthetic set they generate."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_data_arguments(parser: argparse.ArgumentParser, categories: list[str] | None = None) -> None:
    """``--categories`` (default ``categories``, else every synthetic category), ``--image-size``, ``--seed``."""
    from edgead.data import synth

    parser.add_argument("--categories", nargs="*", default=list(categories or synth.CATEGORIES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def generate_study_data(args: argparse.Namespace, prefix: str) -> tuple[Path, Path]:
    """(work folder, data root): a fresh temporary folder, and in it the synthetic set of ``args``' categories."""
    from edgead.data import synth

    work = Path(tempfile.mkdtemp(prefix=prefix))
    spec = synth.SynthSpec(image_size=args.image_size, seed=args.seed)
    return work, synth.generate(work / "data", args.categories, spec)
