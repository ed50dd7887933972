"""The one interpreter of a detector's component wiring.

A detector is a list of components, each naming the tensors it reads and the tensors it
writes. The same list is run by PyTorch (the ``forward`` of every detector), by ONNX Runtime
over the per-component graphs, by INT8 calibration (which records every intermediate tensor),
and bound by the TensorRT chain (which allocates a device buffer per tensor). Each caller passes
its own ``call``; the order, the name lookup and the checks are written here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Wired(Protocol):
    """Anything with a name and named inputs/outputs (a torch Component, a manifest entry)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Node:
    """The wiring of one component, without its implementation."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "Node":
        return cls(str(entry["name"]), tuple(entry["inputs"]), tuple(entry["outputs"]))


class WiringError(ValueError):
    """A component reads a tensor nobody wrote, or writes one twice, or returns the wrong count."""


def check_wiring(nodes: Sequence[Wired], inputs: Sequence[str], outputs: Sequence[str] = ()) -> None:
    """Every input of every component is a graph input or an earlier output; ``outputs`` exist."""
    known = set(inputs)
    for node in nodes:
        missing = [n for n in node.inputs if n not in known]
        if missing:
            raise WiringError(f"component {node.name!r} reads {missing}, which no earlier component writes "
                              f"(known: {sorted(known)})")
        twice = [n for n in node.outputs if n in known]
        if twice:
            raise WiringError(f"component {node.name!r} writes {twice}, which already exist")
        known.update(node.outputs)
    absent = [n for n in outputs if n not in known]
    if absent:
        raise WiringError(f"no component writes {absent}")


def run_wiring(nodes: Sequence[Wired], feeds: Mapping[str, T], call: Callable[[Any, list[T]], Sequence[T] | T],
               until: str | None = None) -> dict[str, T]:
    """Run ``nodes`` in order; returns every named tensor (the feeds included).

    ``call(node, inputs)`` runs one component on its input values (in ``node.inputs`` order) and
    returns its outputs (a tuple, or a single value for one output). ``until`` stops after the
    component that writes that tensor.
    """
    if until is not None and until not in feeds and not any(until in n.outputs for n in nodes):
        raise WiringError(f"no component writes {until!r}")
    values: dict[str, T] = dict(feeds)
    for node in nodes:
        if until is not None and until in values:
            break
        try:
            args = [values[name] for name in node.inputs]
        except KeyError as exc:
            raise WiringError(f"component {node.name!r} reads {exc.args[0]!r}, which no earlier component "
                              "writes") from None
        result = call(node, args)
        result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        if len(result) != len(node.outputs):
            raise WiringError(f"component {node.name!r} returned {len(result)} tensors, declared {node.outputs}")
        values.update(zip(node.outputs, result))
    return values


def io_mismatch(node: Wired, inputs: Iterable[str], outputs: Iterable[str], what: str = "graph") -> str | None:
    """Why a ``what`` (graph, plan) with these input and output names cannot stand in ``node``'s place
    in the wiring; None when its names are the node's."""
    declared, actual = (sorted(node.inputs), sorted(node.outputs)), (sorted(inputs), sorted(outputs))
    if declared == actual:
        return None
    return (f"component {node.name!r}: {what} I/O {actual[0]} -> {actual[1]} does not match the wiring "
            f"{declared[0]} -> {declared[1]}")


def producers(nodes: Sequence[Wired]) -> dict[str, str]:
    """Tensor name -> the component that writes it."""
    return {out: node.name for node in nodes for out in node.outputs}
