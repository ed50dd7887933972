"""GPU verification backend: a torch module on CUDA behind the same slot code as TensorRT.

Pinned host buffers, ``cudaMemcpyAsync`` and per-slot streams/events all come from
:class:`~edgead.engines.cuda_rt.CudaSlots`, exactly as in the TensorRT engine; only the compute
differs. So on a GPU without TensorRT (a cloud H100) this checks the transfer/overlap machinery
the Jetson will use. torch is imported here only, and only when this backend is built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from edgead.engines import cuda_rt
from edgead.core.engine import EngineError, TensorSpec


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise EngineError("the torch-cuda backend needs torch: pip install 'edgead[train]'") from exc
    return torch


class TorchCudaEngine:
    """``module(*inputs) -> tensor | tuple | dict`` run on each slot's own CUDA stream.

    Device inputs are torch tensors that ``cudaMemcpyAsync`` fills through ``data_ptr()``; the
    module runs under ``torch.cuda.ExternalStream(slot stream)`` so its kernels queue behind
    that upload; outputs are copied back from their ``data_ptr()`` on the same stream.
    """

    backend = "torch-cuda"

    def __init__(
        self,
        module: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        num_slots: int = 2,
        device: int = 0,
        precision: str = "fp32",
        cuda_graph: bool = False,
    ) -> None:
        torch = self._torch = _torch()
        if not torch.cuda.is_available():
            raise EngineError("CUDA is not available to torch")
        if precision not in ("fp32", "fp16"):
            raise EngineError(f"torch-cuda runs fp32 or fp16 (autocast), not {precision!r}")
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.precision, self.num_slots = precision, int(num_slots)
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        torch.cuda.init()  # torch and cuda-python then share the device's primary context
        cuda_rt.set_device(device)
        self.module = module.to(self.device).eval()
        self._slots = cuda_rt.CudaSlots(self.inputs, self.outputs, self.num_slots, allocate_device=False)
        self._dev_in = [
            {s.name: torch.empty(s.shape, dtype=getattr(torch, np.dtype(s.dtype).name), device=self.device) for s in self.inputs}
            for _ in range(self.num_slots)
        ]
        self._streams = [torch.cuda.ExternalStream(self._slots[k].stream.handle, device=self.device) for k in range(self.num_slots)]
        torch.cuda.synchronize(self.device)  # the input tensors exist before other streams write them
        # A CUDA graph per slot makes enqueue one launch, as TensorRT's execute_async_v3 is: eager
        # torch on a fast GPU is bound by Python launching kernels, which hides any overlap.
        self._graphs = [self._capture(k) for k in range(self.num_slots)] if cuda_graph else []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._slots.fill(0, feeds)
        self.enqueue(0)
        return self.synchronize(0)

    def host_inputs(self, slot: int) -> dict[str, np.ndarray]:
        return self._slots.host_inputs(slot)

    def _autocast(self) -> Any:
        torch = self._torch
        return torch.autocast("cuda", dtype=torch.float16) if self.precision == "fp16" else contextlib.nullcontext()

    def _capture(self, slot: int) -> tuple[Any, dict[str, Any]]:
        """Capture the module on the slot's input tensors; replays reuse its output tensors."""
        torch, args = self._torch, [self._dev_in[slot][s.name] for s in self.inputs]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._autocast():
            for _ in range(3):  # lazy init and library workspaces must happen outside the capture
                self._named(self.module(*args))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), self._autocast(), torch.cuda.graph(graph):
            outs = self._named(self.module(*args))
        torch.cuda.synchronize(self.device)
        return graph, outs

    def enqueue(self, slot: int) -> None:
        torch, tensors = self._torch, self._dev_in[slot]
        self._slots.upload(slot, {n: t.data_ptr() for n, t in tensors.items()})
        try:
            with torch.cuda.stream(self._streams[slot]), torch.inference_mode(), self._autocast():
                if self._graphs:
                    graph, outs = self._graphs[slot]
                    graph.replay()  # on the current stream: the slot's
                else:
                    outs = self._named(self.module(*(tensors[s.name] for s in self.inputs)))
        except Exception:
            self._slots.wait(slot)  # drain the queued upload; the slot stays usable
            raise
        # Keep the output tensors alive until synchronize: the D2H copies read their memory.
        self._slots[slot].extra.extend(outs.values())
        self._slots.download(slot, {n: t.data_ptr() for n, t in outs.items()})

    def _named(self, result: Any) -> dict[str, Any]:
        torch = self._torch
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            items = [(s, result.get(s.name)) for s in self.outputs]
        else:
            if len(result) != len(self.outputs):
                raise EngineError(f"module returned {len(result)} outputs, expected {len(self.outputs)}")
            items = list(zip(self.outputs, result))
        outs = {}
        for spec, t in items:
            if t is None or tuple(t.shape) != spec.shape:
                raise EngineError(f"output {spec.name!r}: expected shape {spec.shape}, got {None if t is None else tuple(t.shape)}")
            # Still on the slot's stream: dtype cast and a contiguous layout for a flat D2H copy.
            outs[spec.name] = t.to(getattr(torch, np.dtype(spec.dtype).name)).contiguous()
        return outs

    def synchronize(self, slot: int) -> dict[str, np.ndarray]:
        return self._slots.wait(slot)

    def last_timings(self, slot: int = 0) -> dict[str, float]:
        return self._slots.timings(slot)

    def timeline(self, slot: int, origin: cuda_rt.Event) -> tuple[float, float, float, float]:
        return self._slots.timeline(slot, origin)

    def close(self) -> None:
        self._slots.close()
        self._dev_in, self._streams, self._graphs = [], [], []
