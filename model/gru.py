"""The GRU text classifier: Embedding -> GRU (L layers, hidden H) -> Linear over C labels.

One set of weights serves two entry points:

* ``forward(token_ids[B,T], lengths)`` gives logits at every position; it serves training
  and offline evaluation.
* ``step(h[L,B,H], token_ids[B,K], lengths[B])`` advances B independent sessions by one
  message each (K_b = lengths[b] tokens) and returns the new state and the class
  probabilities after each message. It is what the streaming worker calls for short messages.
* ``advance(h, token_ids[N], lengths[B], read_row[R], read_at[R])`` advances B sessions by a
  token sequence each (the rows' tokens back to back, no padding) and returns the new state and
  the probabilities at R points of those sequences: several messages of one session run as
  one sequence read at each message's end, and long ones cost their tokens, not a padded
  (B, longest) batch.

A GRU has no cell state: a session's whole memory is ``h``, one vector per layer. Folding
``step`` over any chunking of a text gives the same ``h`` and probabilities as ``forward``
over the whole text (see tests/test_gru.py).

Mean units (``mean_dim`` M > 0) sit beside the GRU: a table of M-wide token vectors whose
exact running mean over every token so far the head reads beside the GRU's top layer — a
streamed linear bag-of-words model, O(1) per token. A GRU unit can only hold a moving
average of fixed windows (see model/bag.py); the mean units hold the mean itself. The state
is then (L, B, H + M + 1): the top layer's row ends with the mean and the token count (float:
exact to 2**24 tokens in float32, to 2,048 in a float16 state or with a float16 model
dtype, where past 65,504 the count
becomes inf and the mean stops moving — by then a token would move it by under 1/65,504);
lower layers hold zeros there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence


# Messages up to this many tokens take the unrolled step (a table lookup and K small
# matmuls); longer ones go through nn.GRU's fused loop. Both compute the same function.
UNROLL_MAX_TOKENS = 32
# Most tokens one model call embeds at once (rows x time window, padding included): what
# bounds the activations of a batch (about 4 KB a token for the default model), whatever
# its messages' lengths. ``advance`` cuts longer work into time windows of this many tokens.
WINDOW_TOKENS = 8192

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "linear": lambda x: x}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_labels: int
    embed_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.2  # on embeddings and between layers; inactive in eval mode
    head_hidden: int = 0  # > 0: a Dense layer of this width (then head_activation) before the head
    head_activation: str = "relu"
    mean_dim: int = 0  # > 0: mean units of this width beside the GRU (see the module's doc)

    @property
    def state_size(self) -> int:
        """Floats per layer and session in the state: h, then the mean units and their count."""
        return self.hidden_size + (self.mean_dim + 1 if self.mean_dim else 0)

    def to_dict(self) -> dict:
        return asdict(self)


class GRUClassifier(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        if config.head_activation not in _ACTIVATIONS:
            raise ValueError(f"head_activation {config.head_activation!r} is not one of "
                             f"{sorted(_ACTIVATIONS)}")
        self.mean_embed = (nn.Embedding(config.vocab_size, config.mean_dim, padding_idx=0)
                           if config.mean_dim else None)
        if self.mean_embed is not None:
            nn.init.normal_(self.mean_embed.weight, std=0.1)
        read = config.hidden_size + config.mean_dim
        self.pre_head = nn.Linear(read, config.head_hidden) if config.head_hidden else None
        self.head = nn.Linear(config.head_hidden or read, config.num_labels)

    def classify_hidden(self, out: torch.Tensor) -> torch.Tensor:
        """Logits from top-layer GRU outputs (and the mean units' means, if any),
        (..., H + M) -> (..., C)."""
        x = self.drop(out)
        if self.pre_head is not None:
            x = _ACTIVATIONS[self.config.head_activation](self.pre_head(x))
        return self.head(x)

    def initial_state(self, batch: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        c = self.config
        return torch.zeros(c.num_layers, batch, c.state_size, device=device, dtype=dtype)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                h0: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position, (B, T, C).

        The GRU reads left to right, so right padding never changes the outputs at real
        positions; ``lengths`` is accepted for symmetry with ``step`` and callers mask
        positions ``>= lengths`` themselves. ``h0``: a state (L, B, state_size) to go on from.
        """
        H = self.config.hidden_size
        x = self.drop(self.embed(token_ids))  # (B, T, E)
        out, _ = self.gru(x, None if h0 is None else h0[..., :H].contiguous())  # (B, T, H)
        if self.mean_embed is not None:
            out = torch.cat([out, self.running_means(token_ids, h0)], -1)
        return self.classify_hidden(out)  # (B, T, C)

    def running_means(self, token_ids: torch.Tensor, h0: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The mean units' values after every position, (B, T, M): the mean of the token
        vectors so far, going on from the mean and count in ``h0`` if given."""
        v = self.mean_embed(token_ids).cumsum(1)  # (B, T, M): sums of the tokens so far
        t = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)[None, :, None]
        if h0 is not None:  # a mean over n0 tokens before these
            m0, n0 = self._mean_and_count(h0)
            v, t = v + (m0 * n0[:, None])[:, None], t + n0[:, None, None]
        return v / t

    def _mean_and_count(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean units' part of a state (L, B, S): their means (B, M) and token counts (B,),
        at the end of the top layer's row."""
        H, M = self.config.hidden_size, self.config.mean_dim
        return h[-1, :, H:H + M], h[-1, :, H + M]

    def _input_bias(self, layer: int) -> torch.Tensor:
        """b_ih with the r and z parts of b_hh folded in: those two add up before the sigmoid,
        so the step adds them once per token instead of once per token and layer and gate."""
        g, H = self.gru, self.config.hidden_size
        b_hh = getattr(g, f"bias_hh_l{layer}")
        return getattr(g, f"bias_ih_l{layer}") + torch.cat([b_hh[: 2 * H], b_hh.new_zeros(H)])

    def prepare_streaming(self, max_table_bytes: int = 512 * 2**20) -> None:
        """Precompute layer 0's input side for every token: (V, 3H) = embed @ W_ih^T + bias.

        The streaming step then looks up a token's gate inputs instead of multiplying for
        them. It snapshots the current weights: call it again after changing them.
        """
        table_bytes = self.config.vocab_size * 3 * self.config.hidden_size * 4
        if table_bytes > max_table_bytes:
            self._input_table = None
            return
        with torch.no_grad():
            self._input_table = torch.addmm(self._input_bias(0), self.embed.weight,
                                            self.gru.weight_ih_l0.t())  # (V, 3H)

    @torch.inference_mode()
    def step(self, h: torch.Tensor, token_ids: torch.Tensor,
             lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance B sessions by one message each.

        h: (L, B, state_size) states before the message; token_ids: (B, K) right-padded;
        lengths: (B,) real tokens per row, >= 0. Returns (new state (L, B, state_size),
        probs (B, C)); the state is h, then the mean units' part if any (see the module's doc).
        A row with length 0 keeps its state.
        """
        if token_ids.shape[1] > UNROLL_MAX_TOKENS:  # long rows: no padded embedding
            B, K = token_ids.shape
            real = (torch.arange(K, device=token_ids.device)[None, :]
                    < lengths.to(token_ids.device)[:, None])
            return self.advance(h, token_ids[real], lengths, torch.arange(B), lengths)
        h_new = self._step_unrolled(self._gru_part(h), token_ids, lengths)
        h_new = self._step_mean(h, h_new, token_ids, lengths)
        probs = torch.softmax(self.classify_hidden(self._readout(h_new)), dim=-1)  # (B, C)
        return h_new, probs

    @torch.inference_mode()
    def advance(self, h: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor,
                read_row: torch.Tensor, read_at: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance B sessions by a token sequence each, predicting at given points of them.

        h: (L, B, state_size) states before; token_ids: (N,) the rows' tokens, row after row;
        lengths: (B,) tokens per row, summing to N (0 keeps the state); read_row, read_at:
        (R,) a prediction after read_at[r] tokens of row read_row[r] (0: the state before).
        Returns (new states (L, B, state_size), probs (R, C)).

        Rows of at most UNROLL_MAX_TOKENS tokens take the unrolled step, padded to the
        longest (the caller groups rows of like length); longer ones nn.GRU's time loop over
        a packed batch built from the token list (no (B, longest) tensor), in time windows
        of at most WINDOW_TOKENS tokens. Cost and memory follow the tokens, not the longest row.
        """
        lens = lengths.cpu().numpy().astype(np.int64)
        starts = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=starts[1:])
        rr = read_row.cpu().numpy().astype(np.int64)
        ra = read_at.cpu().numpy().astype(np.int64)
        h_gru = self._gru_part(h)
        if lens.size and lens.max() > UNROLL_MAX_TOKENS:
            h_new, top = self._advance_packed(h_gru, token_ids, lens, starts, rr, ra)
        else:
            h_new, top = self._advance_unrolled(h_gru, token_ids, lens, starts, rr, ra)
        if self.mean_embed is not None:
            h_new, means = self._advance_mean(h, h_new, token_ids, lens, starts, rr, ra)
            top = torch.cat([top, means], -1)
        return h_new, torch.softmax(self.classify_hidden(top), dim=-1)  # (R, C)

    def _advance_unrolled(self, h: torch.Tensor, token_ids: torch.Tensor, lens: np.ndarray,
                          starts: np.ndarray, rr: np.ndarray, ra: np.ndarray
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Short rows of any lengths: (new GRU state, top-layer output at each read). The rows
        run longest first, and each time step computes only the rows that still have a token
        (``_step_shrinking``): no padding, whatever mix of lengths the rows have."""
        B, K = len(lens), int(lens.max()) if lens.size else 0
        dev = token_ids.device
        rows = torch.from_numpy(rr).to(dev)
        before = h[-1].index_select(0, rows)  # reads after 0 tokens: the state before
        if not K:
            return h.clone(), before
        order = np.argsort(-lens, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(B)
        slen = lens[order]
        real = np.arange(K)[None, :] < slen[:, None]  # (B, K), by rank
        pos = (starts[:-1][order][:, None] + np.arange(K)[None, :])[real]
        ids = torch.zeros((B, K), dtype=token_ids.dtype, device=dev)
        ids[torch.from_numpy(real).to(dev)] = token_ids[torch.from_numpy(pos).to(dev)]
        h_sorted, tops = self._step_shrinking(
            h.index_select(1, torch.from_numpy(order).to(dev)), ids, slen)  # tops: (B, K, H)
        h_new = h_sorted.index_select(1, torch.from_numpy(rank).to(dev))
        at = torch.from_numpy(np.maximum(ra - 1, 0)).to(dev)
        top = tops[torch.from_numpy(rank[rr]).to(dev), at]
        return h_new, torch.where(torch.from_numpy(ra == 0).to(dev)[:, None], before, top)

    def _step_shrinking(self, h: torch.Tensor, token_ids: torch.Tensor, lens: np.ndarray
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_step_unrolled`` for rows sorted longest first (``lens`` descending, on the
        host): time step t runs the first ``count(lens > t)`` rows only, in place, so a batch
        of mixed lengths costs its tokens, not rows x longest. Returns (new state (L, B, H),
        the top layer after every token (B, K, H); zero past a row's length)."""
        B, K = token_ids.shape
        gi0 = self._input_gates(token_ids)  # (B, K, 3H)
        state = h.clone()  # (L, B, H), updated in place
        tops = h.new_zeros(B, K, self.config.hidden_size)
        active = (lens[None, :] > np.arange(K)[:, None]).sum(1).tolist()  # rows at each t
        for t in range(K):
            n = active[t]
            x_gates = gi0[:n, t]
            for layer in range(state.shape[0]):
                if layer:
                    x_gates = self._layer_input(layer, state[layer - 1, :n])
                state[layer, :n] = self._cell(layer, x_gates, state[layer, :n])
            tops[:n, t] = state[-1, :n]
        return state, tops

    def _advance_packed(self, h: torch.Tensor, token_ids: torch.Tensor, lens: np.ndarray,
                        starts: np.ndarray, rr: np.ndarray, ra: np.ndarray
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Long rows: nn.GRU over packed time windows, rows sorted longest first (a packed
        batch at time t is the first batch_sizes[t] rows); the state carries across windows."""
        dev = token_ids.device
        order = np.argsort(-lens, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        slen, sstart = lens[order], starts[:-1][order]  # by rank
        hs = h.index_select(1, torch.from_numpy(order).to(dev))  # (L, B, H), by rank
        top = h[-1].index_select(0, torch.from_numpy(rr).to(dev))  # reads after 0 tokens
        tok = ra - 1  # the token each read follows
        read_rank = rank[rr]
        a = 0
        while True:
            active = int(np.count_nonzero(slen > a))
            if not active:
                break
            b = a + max(1, WINDOW_TOKENS // active)
            wl = np.minimum(slen[:active], b) - a  # tokens in the window, descending
            T = int(wl[0])
            batch = active - np.searchsorted(wl[::-1], np.arange(T), side="right")  # (T,)
            first = np.zeros(T, np.int64)  # packed index of each time step's first row
            np.cumsum(batch[:-1], out=first[1:])
            n = int(batch.sum())
            t_of = np.repeat(np.arange(T), batch)
            k_of = np.arange(n) - np.repeat(first, batch)
            src = torch.from_numpy(sstart[k_of] + a + t_of).to(dev)
            x = self.embed(token_ids[src])  # (n, E), time-major packed
            packed = PackedSequence(x, torch.from_numpy(batch))
            out, h_win = self.gru(packed, hs[:, :active].contiguous())  # out.data: (n, H)
            hs[:, :active] = h_win
            sel = np.flatnonzero((tok >= a) & (tok < b))
            if sel.size:
                at = first[tok[sel] - a] + read_rank[sel]
                top[torch.from_numpy(sel).to(dev)] = out.data[torch.from_numpy(at).to(dev)]
            a = b
        return hs.index_select(1, torch.from_numpy(rank).to(dev)), top

    def _advance_mean(self, h: torch.Tensor, h_gru: torch.Tensor, token_ids: torch.Tensor,
                      lens: np.ndarray, starts: np.ndarray, rr: np.ndarray, ra: np.ndarray
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean units after each row and at each read: prefix sums of the token vectors
        (float64, so that differences of long prefixes stay exact), taken in windows."""
        dev, M = token_ids.device, self.config.mean_dim
        ends = np.concatenate([starts[rr] + ra, starts[:-1], starts[1:]])
        need, inv = np.unique(ends, return_inverse=True)
        sums = torch.zeros(len(need), M, dtype=torch.float64, device=dev)
        carry = torch.zeros(M, dtype=torch.float64, device=dev)
        N = int(starts[-1])
        for c0 in range(0, N, WINDOW_TOKENS):
            c1 = min(N, c0 + WINDOW_TOKENS)
            cs = self.mean_embed(token_ids[c0:c1]).double().cumsum(0) + carry  # sums to c0+j+1
            sel = np.flatnonzero((need > c0) & (need <= c1))
            if sel.size:
                at = torch.from_numpy(need[sel] - c0 - 1).to(dev)
                sums[torch.from_numpy(sel).to(dev)] = cs[at]
            carry = cs[-1]
        at = sums[torch.from_numpy(inv).to(dev)]
        R, B = len(rr), len(lens)
        s_read = at[:R] - at[R:R + B][torch.from_numpy(rr).to(dev)]
        s_row = at[R + B:] - at[R:R + B]
        m0, n0 = (v.double() for v in self._mean_and_count(h))
        rows = torch.from_numpy(rr).to(dev)

        def mean(m, n, s, k):  # the step's convex update, m + (s / k - m) * k / (n + k)
            return torch.lerp(m, s / k.clamp(min=1)[:, None], (k / (n + k).clamp(min=1))[:, None])

        k_read = torch.from_numpy(ra).to(dev, torch.float64)
        k_row = torch.from_numpy(lens).to(dev, torch.float64)
        at_reads = mean(m0[rows], n0[rows], s_read, k_read).to(h.dtype)
        tail = h.new_zeros(h.shape[0], h.shape[1], M + 1)
        tail[-1, :, :M] = mean(m0, n0, s_row, k_row).to(h.dtype)
        tail[-1, :, M] = (n0 + k_row).to(h.dtype)
        return torch.cat([h_gru, tail], -1), at_reads

    def _gru_part(self, h: torch.Tensor) -> torch.Tensor:
        """The GRU's own part of a state, contiguous (the step's matmuls run a tenth slower on
        a strided view)."""
        return h if self.mean_embed is None else h[..., : self.config.hidden_size].contiguous()

    def _readout(self, h: torch.Tensor) -> torch.Tensor:
        """What the head reads of a state (L, B, S): the top layer, less the token count."""
        return h[-1, :, : self.config.hidden_size + self.config.mean_dim]

    def _step_mean(self, h: torch.Tensor, h_gru: torch.Tensor, token_ids: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
        """The full new state: the GRU's part ``h_gru`` (L, B, H) and, with mean units, the
        top layer's running mean and token count advanced by each row's real tokens."""
        if self.mean_embed is None:
            return h_gru
        M = self.config.mean_dim
        K = token_ids.shape[1]
        real = (torch.arange(K, device=token_ids.device)[None, :]
                < lengths.to(token_ids.device)[:, None])  # (B, K)
        sums = (self.mean_embed(token_ids) * real[..., None].to(h.dtype)).sum(1)  # (B, M)
        m, n = self._mean_and_count(h)
        k = lengths.to(h.dtype)
        total = n + k
        # m + (message mean - m) * k / (n + k): a convex step, so the mean stays as well
        # conditioned after a million tokens as after ten. Rows with no tokens (k = 0) keep
        # theirs: their weight is 0, also when a float16 count has become inf.
        w = (k / total.clamp(min=1))[:, None]
        m_new = torch.lerp(m, sums / k.clamp(min=1)[:, None], w)
        tail = h.new_zeros(h.shape[0], h.shape[1], M + 1)
        tail[-1, :, :M], tail[-1, :, M] = m_new, total
        return torch.cat([h_gru, tail], -1)

    @torch.inference_mode()
    def step_static(self, h: torch.Tensor, token_ids: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` with no data-dependent branch or host sync, for CUDA graph capture:
        always the unrolled, masked path. Same results as ``step``."""
        h_new = self._step_unrolled(self._gru_part(h), token_ids, lengths, masked=True)
        h_new = self._step_mean(h, h_new, token_ids, lengths)
        return h_new, torch.softmax(self.classify_hidden(self._readout(h_new)), dim=-1)

    def _step_unrolled(self, h: torch.Tensor, token_ids: torch.Tensor,
                       lengths: torch.Tensor, masked: bool | None = None) -> torch.Tensor:
        """Short messages: K explicit GRU steps (``_cell``); rows past their length keep their
        state. Returns the new state (L, B, H)."""
        K = token_ids.shape[1]
        gi0 = self._input_gates(token_ids)  # (B, K, 3H)
        state = list(h.unbind(0))  # L x (B, H)
        if masked is None:
            masked = not bool((lengths >= K).all())
        mask = None if not masked else (torch.arange(K, device=lengths.device)[None, :]
                                  < lengths.to(token_ids.device)[:, None])  # (B, K)
        for t in range(K):
            x_gates = gi0[:, t]  # (B, 3H), b_ih and b_hr, b_hz included
            for layer in range(len(state)):
                if layer:
                    x_gates = self._layer_input(layer, state[layer - 1])
                h_prev = state[layer]
                new = self._cell(layer, x_gates, h_prev)
                state[layer] = new if mask is None else torch.where(mask[:, t:t + 1], new, h_prev)
        return torch.stack(state)  # (L, B, H)

    def _input_gates(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Layer 0's input side of the gates for each token, (..., 3H), b_ih and b_hr, b_hz
        included: the precomputed table if any."""
        table = getattr(self, "_input_table", None)
        if table is not None and not self.training:
            return table[token_ids]
        return F.linear(self.embed(token_ids), self.gru.weight_ih_l0, self._input_bias(0))

    def _layer_input(self, layer: int, below: torch.Tensor) -> torch.Tensor:
        """The input side of ``layer``'s gates (> 0), from the new state of the layer below."""
        return F.linear(below, getattr(self.gru, f"weight_ih_l{layer}"), self._input_bias(layer))

    def _cell(self, layer: int, x_gates: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """One step of ``layer``: ATen's GRU cell — r, z = sigmoid(x_rz + h_rz),
        n = tanh(x_n + r * h_n), h' = n + z * (h - n) — in fused ops (addmm, addcmul, lerp)."""
        g, H = self.gru, self.config.hidden_size
        w_hh, b_hh = getattr(g, f"weight_hh_l{layer}"), getattr(g, f"bias_hh_l{layer}")
        rz = torch.addmm(x_gates[:, : 2 * H], h_prev, w_hh[: 2 * H].t()).sigmoid_()
        h_n = torch.addmm(b_hh[2 * H:], h_prev, w_hh[2 * H:].t())  # (B, H)
        n = torch.addcmul(x_gates[:, 2 * H:], rz[:, :H], h_n).tanh_()
        return torch.lerp(n, h_prev, rz[:, H:])  # n + z * (h - n)
