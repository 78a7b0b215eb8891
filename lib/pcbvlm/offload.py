"""Checkpointed decoder layers keep their inputs in CPU memory (`train.offload_checkpoints`, issue 20).

With gradient checkpointing, each checkpointed decoder layer keeps only its input hidden state for the
backward pass (everything else is recomputed): 11,488 tokens x 5120 x 2 B = 118 MB per layer at
micro-batch 16, 7.0 GiB over the 32B's 64 layers. Unsloth's gradient checkpointing moves these inputs
to the CPU; this module does the same for the checkpointing transformers already runs.

How: torch's non-reentrant checkpoint saves the layer's inputs as saved tensors of the autograd graph,
so a `torch.autograd.graph.saved_tensors_hooks` pair around the checkpointed call sees exactly them
(the tensors saved inside the layer go to the checkpoint's own inner hooks, which take precedence).

- pack (forward): copy the input into pinned CPU memory on a side CUDA stream, after an event on the
  compute stream; the GPU tensor is released as usual, `record_stream` keeps the allocator from
  reusing it before the copy has read it. The compute stream never waits for these copies.
- unpack (backward, when the layer is recomputed): the compute stream waits only for this layer's
  copy back, which was started while the layer after it was being recomputed: every unpack also starts
  the copy back of the input of the layer before (double buffering: at most two inputs on the GPU).
  Only the first checkpointed layer of the backward pass (the last one of the forward) waits for a
  copy that was not prefetched.

`torch.autograd.graph.save_on_cpu` does the copies on the compute stream, synchronously from the
GPU's point of view: every forward layer would wait for its 118 MB device-to-host copy and every
recomputation for its host-to-device copy (~3-5 ms each at PCIe speeds, ~5-8% of a 60 ms layer).

Without CUDA (the CPU tests, `make demo`) the same hooks keep a plain copy and no streams exist; the
bookkeeping (which inputs were packed, the prefetch chain) is the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

# Smaller saved inputs stay where they are: the copies are worth it for hidden states only.
MIN_OFFLOAD_BYTES = 1 << 16


class _Offloaded:
    """One saved layer input, now in host memory; `previous` is the input packed before it (a weak
    reference: the previous step's inputs die with their graph)."""

    __slots__ = ("host", "device", "previous", "on_device", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, previous: _Offloaded | None):
        self.host = host
        self.device = device
        self.previous = weakref.ref(previous) if previous is not None else None
        self.on_device: torch.Tensor | None = None  # prefetched copy, until the backward takes it
        self.ready: Any = None  # CUDA event: the prefetched copy is complete


class CheckpointOffload:
    """Saved-tensor hooks that move checkpointed layers' inputs to host memory and back (see the module
    docstring). One instance per model; `wrap` puts a checkpointing function under the hooks."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.min_bytes = min_bytes
        self._last: weakref.ref | None = None  # the input packed last (dies with its graph)
        self._streams: dict[torch.device, Any] = {}
        # Counters for the benchmark and the tests: inputs and bytes moved to the host, copies back,
        # and how many of those had been prefetched.
        self.packed = 0
        self.packed_bytes = 0
        self.unpacked = 0
        self.prefetched = 0

    def wrap(self, checkpoint_fn: Callable) -> Callable:
        """`checkpoint_fn` (a layer's `_gradient_checkpointing_func`) with its saved inputs offloaded."""

        def offloaded_checkpoint(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_fn(*args, **kwargs)

        offloaded_checkpoint.pcbvlm_offloaded = checkpoint_fn  # type: ignore[attr-defined]
        return offloaded_checkpoint

    def _side_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if tensor.device.type == "cuda":
            side = self._side_stream(tensor.device)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input has been computed
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(side)  # not reused by the allocator before the copy has read it
        elif tensor.device.type == "cpu":
            host = tensor.detach().clone()  # no device: a plain copy, the same bookkeeping
        else:
            return tensor
        holder = _Offloaded(host, tensor.device, self._last() if self._last is not None else None)
        self._last = weakref.ref(holder)
        self.packed += 1
        self.packed_bytes += tensor.numel() * tensor.element_size()
        return holder

    def _fetch(self, holder: _Offloaded) -> None:
        """Start the copy back to the device (on the side stream, into memory of the side stream's pool)."""
        if holder.device.type != "cuda":
            holder.on_device = holder.host.clone()
            return
        side = self._side_stream(holder.device)
        with torch.cuda.stream(side):
            # The side stream's earlier device-to-host copy into `host` comes first in stream order.
            on_device = torch.empty(holder.host.shape, dtype=holder.host.dtype, device=holder.device)
            on_device.copy_(holder.host, non_blocking=True)
            holder.ready = torch.cuda.Event()
            holder.ready.record(side)
        holder.on_device = on_device

    def unpack(self, holder):
        if not isinstance(holder, _Offloaded):
            return holder
        if holder.on_device is None:
            self._fetch(holder)
        else:
            self.prefetched += 1
        tensor, holder.on_device = holder.on_device, None
        if holder.ready is not None:
            compute = torch.cuda.current_stream(holder.device)
            compute.wait_event(holder.ready)
            tensor.record_stream(compute)  # allocated on the side stream, used and freed on this one
            holder.ready = None
        self.unpacked += 1
        # The backward recomputes the layers in reverse: the input packed before this one is next.
        previous = holder.previous() if holder.previous is not None else None
        if previous is not None and previous.on_device is None:
            self._fetch(previous)
        return tensor


def offload_checkpointed_inputs(layers, offload: CheckpointOffload | None = None) -> CheckpointOffload:
    """Put the checkpointed ones of `layers` (transformers' GradientCheckpointingLayer, after
    `gradient_checkpointing_enable` and the uncheckpointed layers' flags are set) under `offload`'s
    hooks. Uncheckpointed layers keep their activations on the GPU as before. `gradient_checkpointing_
    enable` sets a fresh checkpointing function, which undoes this."""
    offload = offload or CheckpointOffload()
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        current = layer._gradient_checkpointing_func
        if hasattr(current, "pcbvlm_offloaded"):
            current = current.pcbvlm_offloaded
        layer._gradient_checkpointing_func = offload.wrap(current)
    return offload


def offloaded_layers(layers) -> int:
    """How many of `layers` have their checkpointed inputs offloaded."""
    return sum(
        hasattr(getattr(layer, "_gradient_checkpointing_func", None), "pcbvlm_offloaded") for layer in layers
    )
