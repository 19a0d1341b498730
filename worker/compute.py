"""Where a model step runs: eager on the CPU or a GPU, or replayed from CUDA graphs.

``Stepper.step(h, ids, lengths)`` (one short message per session) and ``Stepper.advance``
(a token sequence per session, read at given points: several messages, or long ones) take
and return tensors on the engine's device, in float32. With bucketing on, a ``step`` of B
sessions x K tokens is padded up to the nearest (batch, tokens) bucket: padding rows have
length 0, so they keep their zero state and are cut off again. On CUDA each bucket's step is
captured once as a CUDA graph and replayed, which removes the kernel-launch overhead that
dominates small batches; ``advance`` runs eager.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.gru import UNROLL_MAX_TOKENS, GRUClassifier

log = logging.getLogger(__name__)

BATCH_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(17))  # 1 .. 65,536 sessions
TOKEN_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
MAX_GRAPHS = 96  # captured CUDA graphs kept (each holds its bucket's buffers on the GPU)
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n``, or None when ``n`` is larger than all of them."""
    for b in buckets:
        if b >= n:
            return b
    return None


def pad_round(h: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, batch: int,
              tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a round to (batch, tokens); padding rows have length 0 and a zero state."""
    L, B, H = h.shape
    hp = h.new_zeros(L, batch, H)
    hp[:, :B] = h
    ip = ids.new_zeros(batch, tokens)
    ip[:B, : ids.shape[1]] = ids
    lp = lengths.new_zeros(batch)
    lp[:B] = lengths
    return hp, ip, lp


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    h: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor
    h_out: torch.Tensor
    probs: torch.Tensor


class Stepper:
    def __init__(self, model: GRUClassifier, device: str = "cpu", dtype: str = "float32",
                 buckets: bool | None = None, cuda_graphs: bool | None = None) -> None:
        self.device = torch.device(device)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if dtype == "float16" and self.device.type != "cuda":
            raise ValueError("dtype=float16 needs a CUDA device; on the CPU use float32")
        self.dtype = _DTYPES[dtype]
        self.model = model.eval().to(self.device, self.dtype)
        self.model.prepare_streaming()
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.buckets = self.cuda_graphs if buckets is None else buckets
        self._graphs: dict[tuple[int, int], _Graph] = {}

    @torch.inference_mode()
    def step(self, h: torch.Tensor, ids: torch.Tensor,
             lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (L, B, H) float32, ids (B, K), lengths (B,) -> new h float32, probs float32."""
        B, K = ids.shape
        bb, kb = bucket_for(B, BATCH_BUCKETS), bucket_for(K, TOKEN_BUCKETS)
        if not self.buckets or bb is None or kb is None or kb > UNROLL_MAX_TOKENS:
            h_new, probs = self.model.step(h.to(self.dtype), ids, lengths)
            return h_new.float(), probs.float()
        if self.cuda_graphs and ((bb, kb) in self._graphs or len(self._graphs) < MAX_GRAPHS):
            g = self._graphs.get((bb, kb)) or self._capture(bb, kb)
            g.h.zero_()
            g.h[:, :B] = h
            g.ids.zero_()
            g.ids[:B, :K] = ids
            g.lengths.zero_()
            g.lengths[:B] = lengths
            g.graph.replay()
            return g.h_out[:, :B].float(), g.probs[:B].float()
        hp, ip, lp = pad_round(h.to(self.dtype), ids, lengths, bb, kb)
        h_new, probs = self.model.step_static(hp, ip, lp)
        return h_new[:, :B].float(), probs[:B].float()

    @torch.inference_mode()
    def advance(self, h: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                read_row: torch.Tensor, read_at: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``GRUClassifier.advance``, eager on any device: h (L, B, H) float32, ids (N,) the
        rows' tokens back to back, lengths (B,), reads (R,) -> new h, probs (R, C) float32."""
        h_new, probs = self.model.advance(h.to(self.dtype), ids, lengths, read_row, read_at)
        return h_new.float(), probs.float()

    def _capture(self, batch: int, tokens: int) -> _Graph:
        c = self.model.config
        h = torch.zeros(c.num_layers, batch, c.state_size, device=self.device, dtype=self.dtype)
        ids = torch.zeros(batch, tokens, dtype=torch.long, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self.model.step_static(h, ids, lengths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            h_out, probs = self.model.step_static(h, ids, lengths)
        g = _Graph(graph, h, ids, lengths, h_out, probs)
        self._graphs[(batch, tokens)] = g
        log.info("captured a CUDA graph for %d sessions x %d tokens", batch, tokens)
        return g
