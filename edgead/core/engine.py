"""One ``Engine`` interface for every backend (torch, onnxruntime, tensorrt).

The runtime and the benchmarks talk only to this protocol, so they cannot tell backends apart.
Nothing here imports torch.

Two ways to run:
- ``run(feeds)``: synchronous, for parity checks and simple callers.
- slots, for overlapped pipelines: fill ``host_inputs(slot)`` (pinned memory on CUDA backends),
  ``enqueue(slot)`` starts upload + compute + download on that slot's stream and returns at once
  where the backend is asynchronous, and ``synchronize(slot)`` waits and returns the outputs.
  With two slots frame N+1's upload overlaps frame N's compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from edgead.core.contract import ANOMALY_MAP, IMAGE, SCORE


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def empty(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype)


class EngineError(RuntimeError):
    """An engine failed to load, build or run. The runtime turns it into an ERROR verdict."""


@runtime_checkable
class Engine(Protocol):
    backend: str  # "torch" | "onnxruntime" | "tensorrt" | ...
    precision: str  # "fp32" | "fp16" | "int8"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_slots: int

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def host_inputs(self, slot: int) -> dict[str, np.ndarray]: ...

    def enqueue(self, slot: int) -> None: ...

    def synchronize(self, slot: int) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class SlottedEngine:
    """Slot plumbing for synchronous backends: host buffers are plain arrays and ``enqueue`` runs
    the batch at once. Subclasses implement :meth:`run`."""

    backend = "abstract"
    precision = "fp32"
    num_slots = 2

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._host = [{s.name: s.empty() for s in inputs} for _ in range(self.num_slots)]
        self._results: list[dict[str, np.ndarray] | None] = [None] * self.num_slots
        self._errors: list[BaseException | None] = [None] * self.num_slots

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def host_inputs(self, slot: int) -> dict[str, np.ndarray]:
        return self._host[slot]

    def enqueue(self, slot: int) -> None:
        # Errors surface at synchronize(), where an asynchronous backend would report them too.
        try:
            self._results[slot], self._errors[slot] = self.run(self._host[slot]), None
        except Exception as exc:  # noqa: BLE001 - re-raised at synchronize
            self._results[slot], self._errors[slot] = None, exc

    def synchronize(self, slot: int) -> dict[str, np.ndarray]:
        error, result = self._errors[slot], self._results[slot]
        self._errors[slot] = self._results[slot] = None
        if error is not None:
            raise EngineError(f"{self.backend} engine failed: {error}") from error
        if result is None:
            raise EngineError(f"slot {slot} was synchronised without enqueue")
        return result

    def close(self) -> None:
        pass

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        for spec in self.inputs:
            if spec.name not in feeds:
                raise EngineError(f"missing input {spec.name!r}; engine expects {[s.name for s in self.inputs]}")
            got = tuple(feeds[spec.name].shape)
            if got != spec.shape:
                raise EngineError(f"input {spec.name!r} has shape {got}, engine expects {spec.shape}")


def run_batch(engine: Engine, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score (N,) float64 and raw map (N, H, W) float32 of ``engine`` on images (N, C, H, W),
    one image at a time: the one loop that parity, ``edgead eval`` on a bundle and the station's
    own certification share, so they measure the same thing."""
    scores, maps = [], []
    for image in images:
        out = engine.run({IMAGE: image[None].astype(np.float32, copy=False)})
        scores.append(float(np.asarray(out[SCORE]).reshape(-1)[0]))
        maps.append(np.array(out[ANOMALY_MAP], np.float32).reshape(images.shape[-2:]))
    return np.array(scores, np.float64), np.stack(maps)
