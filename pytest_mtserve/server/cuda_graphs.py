"""CUDA graphs of the decoder for packed prefills: one recorded launch sequence replayed
instead of some 550 module calls from Python per forward pass.

At 8B on an H200 a packed prefill of a batch of 8 spent 49 of its 51 ms enqueueing kernels
(docs/performance.md): the GPU waited on Python. Shapes are padded up to a fixed set of
buckets (``padded_shape``), each with its graph, all captured up front (``shapes``), so that
a capture neither stalls a request stream nor fails halfway through an evaluation; the
padding is GPU work done while the GPU would otherwise wait. Forward passes larger than
``max_tokens`` padded slots run eagerly: there the GPU is the limit, not the launches, and
padding would cost.

All graphs share one memory pool and one set of flat input and output buffers, viewed at
each graph's shape: a graph's intermediates are freed as its capture ends, so the pool holds
the largest graph's activations rather than the sum of all, and the buffers the largest
shape's inputs. Sharing is safe because the graphs replay one at a time on one stream, and
each output is consumed (by the output layer) before the next replay.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

# Padded shapes: each step at most 1.5x (widths) or 2x (rows) the one before, so padding
# never adds more than that to a pass whose GPU time was hidden behind its launches anyway.
_WIDTHS = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_ROWS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # static input [width, rows, hidden]
    mask: torch.Tensor  # static input [rows, 1, width, width], True where a key is hidden
    rotary: torch.Tensor | None  # static input [width, rows, 1, dim]
    output: torch.Tensor  # static output [width, rows, hidden]


class DecoderGraphs:
    """Runs ``decoder`` (Megatron's TransformerBlock, no KV cache) as CUDA graphs, one per
    padded shape of at most ``max_tokens`` slots, or eagerly for larger shapes."""

    def __init__(self, decoder: torch.nn.Module, *, max_tokens: int):
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.enabled = True  # False after a capture ran out of memory: eager from then on
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None  # one memory pool for all graphs, made at the first capture
        self._buffers: dict[str, torch.Tensor] = {}  # flat, sized for max_tokens at the first capture
        fitting = [(rows, width) for rows in _ROWS for width in _WIDTHS if rows * width <= max_tokens]
        self._shapes = sorted(fitting, key=lambda shape: -shape[0] * shape[1])  # largest first

    def __len__(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a graph is made for, largest first."""
        return list(self._shapes)

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The (rows, width) a forward of ``rows`` x ``width`` runs at: its graph's shape, or
        its own when it runs eagerly."""
        if self.enabled:
            padded_rows = next((r for r in _ROWS if r >= rows), None)
            padded_width = next((w for w in _WIDTHS if w >= width), None)
            if (padded_rows, padded_width) in self._shapes:
                return padded_rows, padded_width
        return rows, width

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, rotary: torch.Tensor | None) -> torch.Tensor:
        """The decoder's output [width, rows, hidden]; from a graph, valid until the next call.
        A shape of ``shapes()`` not captured yet is captured now."""
        width, rows = hidden.shape[:2]
        if not self.enabled or (rows, width) not in self._shapes:
            return self._eager(hidden, mask, rotary)
        graph = self._graphs.get((rows, width))
        if graph is None:
            graph = self._capture(rows, width, hidden, mask, rotary)
            if graph is None:
                return self._eager(hidden, mask, rotary)
            self._graphs[rows, width] = graph
        else:
            graph.hidden.copy_(hidden)
            graph.mask.copy_(mask)
            if rotary is not None:
                graph.rotary.copy_(rotary)
        graph.graph.replay()
        return graph.output

    def _eager(self, hidden: torch.Tensor, mask: torch.Tensor, rotary: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)

    def _capture(self, rows: int, width: int, hidden: torch.Tensor, mask: torch.Tensor, rotary: torch.Tensor | None) -> _Graph | None:
        static_hidden, static_mask = self._static("hidden", hidden), self._static("mask", mask)
        static_rotary = None if rotary is None else self._static("rotary", rotary)
        output = self._buffer("output", hidden)[: hidden.numel()].view(hidden.shape)
        try:
            # One eager pass first, on a side stream as capture needs: lazy initialisations
            # (cuBLAS workspaces, Megatron's attention score buffer) must not be recorded.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(static_hidden, static_mask, static_rotary)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: CUDA calls of the server's other threads are neither recorded nor refused.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output.copy_(self._eager(static_hidden, static_mask, static_rotary))
        except torch.cuda.OutOfMemoryError:
            self.enabled = False
            self._graphs.clear()
            torch.cuda.empty_cache()
            print(f"CUDA graphs off: capturing a {rows} x {width} prefill ran out of GPU memory; prefills run eagerly", file=sys.stderr)
            return None
        return _Graph(graph, static_hidden, static_mask, static_rotary, output)

    def _static(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A view of buffer ``name`` at ``value``'s shape, holding ``value``."""
        static = self._buffer(name, value)[: value.numel()].view(value.shape)
        static.copy_(value)
        return static

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Flat buffer ``name`` for ``like``'s dtype, large enough for any graph's shape: the
        [rows, 1, width, width] mask has at most max_tokens x the widest width's elements, the
        [width, rows, ...] tensors max_tokens x their size per slot."""
        if name not in self._buffers:
            per_slot = _WIDTHS[-1] if name == "mask" else like.numel() // (like.shape[0] * like.shape[1])
            self._buffers[name] = torch.empty(self.max_tokens * per_slot, dtype=like.dtype, device=like.device)
        return self._buffers[name]
