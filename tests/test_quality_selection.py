"""benchmarks/quality.py reports the epoch the trainer kept, as the trainer keeps it."""

from __future__ import annotations

from benchmarks.quality import _selected_epoch


def test_selected_epoch_is_the_first_best_proxy_over_all_stages():
    history = [{"stage": "teacher", "epoch": 0, "loss": 1.0},  # a first stage has no proxy AUROC
               {"stage": "students", "epoch": 0, "val_proxy_auroc": 0.70},
               {"stage": "students", "epoch": 1, "val_proxy_auroc": 0.91},
               {"stage": "students", "epoch": 2, "val_proxy_auroc": 0.91},  # ties keep the earlier one
               {"stage": "students", "epoch": 3, "val_proxy_auroc": float("nan")},
               {"stage": "students", "epoch": 4, "val_proxy_auroc": 0.88}]
    assert _selected_epoch(history) == {"selected_epoch": 3, "best_val_proxy_auroc": 0.91}


def test_a_memory_bank_has_no_selected_epoch():
    assert _selected_epoch([]) == {}
    assert _selected_epoch([{"stage": "bank", "epoch": 0}]) == {}
