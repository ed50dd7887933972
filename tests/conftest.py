"""Suite-wide settings and the shared exported bundle (`station`).

The tests run tiny models, where torch's intra-op threads cost more than they give, and on a busy
2-core CI machine two threads per process oversubscribe it. One thread keeps the suite fast there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # a runtime-only install: the torch tests skip themselves
    torch = None

if torch is not None:
    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Certificates are sealed with a per-station key (edgead.certify.certificate): the suite uses
    its own, in a temporary folder, never the user's ~/.config/edgead/station.key."""
    import os
    import tempfile

    if "EDGEAD_STATION_KEY" not in os.environ:
        os.environ["EDGEAD_STATION_KEY"] = os.path.join(tempfile.mkdtemp(prefix="edgead-station-"), "station.key")


STATION_SIZE = 32


@pytest.fixture(scope="session")
def station(tmp_path_factory) -> dict:
    """A small SSIM-AE (32², 2 epochs on synthetic washers) exported at FP32, FP16 and INT8 with its
    golden outputs. Live-PyTorch certification and the torch run's evaluation are taken first;
    then the training run is deleted: the tests work from the bundle alone."""
    pytest.importorskip("torch")
    import shutil

    from edgead.bench import certify_against_run
    from edgead.core.bundle import load_bundle
    from edgead.core.golden import read_golden
    from edgead.data.datasets import load_arrays, mvtec_samples
    from edgead.data.source import DataSource
    from edgead.data.synth import SynthSpec, generate
    from edgead.evaluation.evaluate import evaluate_run
    from edgead.export.bundle_writer import export_run
    from edgead.models.base import TrainConfig
    from edgead.training.reference import reference_outputs
    from edgead.training.trainer import train_run

    tmp = tmp_path_factory.mktemp("station")
    data = generate(tmp / "data", ["washer"], SynthSpec(image_size=STATION_SIZE, n_train=40, n_test_good=4,
                                                          n_test_per_defect=2, seed=0))
    run = train_run("ssim_ae", DataSource.mvtec(data, "washer"), tmp / "run", image_size=STATION_SIZE,
                    config={"width": 8, "latent_dim": 16}, train=TrainConfig(epochs=2, batch_size=8, device="cpu"),
                    progress=False)
    bundle = export_run(run, tmp / "bundle", precisions=("fp32", "fp16", "int8"), calib_count=12)
    golden = read_golden(bundle, load_bundle(bundle).spec.golden)
    live = certify_against_run(bundle, golden.images, golden.masks, golden.labels, run, write=False,
                               data=golden.description)
    torch_eval = evaluate_run(run, DataSource.mvtec(data, "washer"), out_dir=tmp / "eval-run", device="cpu")
    live_ref = reference_outputs(run, golden.images)
    test_images, _, _ = load_arrays(mvtec_samples(data, "washer", "test"), STATION_SIZE, 3)
    test_scores = reference_outputs(run, test_images)["score"]
    shutil.rmtree(run)  # from here on, the bundle alone
    return {"tmp": tmp, "data": data, "bundle": Path(bundle), "run": Path(run), "live": live,
            "torch_eval": torch_eval, "live_ref": live_ref, "test_images": test_images, "test_scores": test_scores}
