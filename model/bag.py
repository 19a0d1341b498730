"""Bag units: GRU units held to a running average of learned token vectors.

A bag-of-words model reads a prefix as well as a long text: it only sums. A GRU can learn
to sum too, but from a few thousand labelled texts it rarely does. So some units of the
top GRU layer are tied to do it. For such a unit ``u`` the gates reduce to

    z_u = sigmoid(b_z)          a fixed decay d_u, whatever the input or the state
    n_u = tanh(W_n[u] . x + b_n) the token's learned value (no recurrent term)
    h_u' = (1 - d_u) * n_u + d_u * h_u

an exponential moving average of the tokens' values over about ``1 / (1 - d_u)`` tokens.
Units get time scales spread geometrically between ``min_tokens`` and ``max_tokens``, so
the head sees both the last sentence's topic and the article's.

They stay ordinary ``nn.GRU`` parameters whose tied entries are zero (the recurrent rows,
the input rows of r and z) or fixed (the z bias), kept so by a gradient mask. Nothing
downstream changes: ``forward`` and ``step`` are the same function, the state is still
``h``, the cost per token is still O(1), a Keras import still maps one-to-one. The free
GRU units read the bag units like any other unit of ``h``.
"""

from __future__ import annotations

import torch
from torch import nn


def time_scales(n: int, min_tokens: float, max_tokens: float) -> list[float]:
    """``n`` averaging windows, geometric from ``min_tokens`` to ``max_tokens``."""
    if n == 1:
        return [max_tokens]
    ratio = (max_tokens / min_tokens) ** (1 / (n - 1))
    return [min_tokens * ratio ** k for k in range(n)]


def tie(gru: nn.GRU, n_units: int, min_tokens: float = 8.0, max_tokens: float = 400.0,
        clock: bool = False) -> list:
    """Turn the last ``n_units`` units of ``gru``'s top layer into bag units, in place.

    Returns the gradient hooks' handles (remove them to untie). Call before building the
    optimiser's state; weight decay must be zero on these tensors, or the tied zeros drift.
    """
    H = gru.hidden_size
    if not 0 < n_units <= H:
        raise ValueError(f"bag units must be in 1..{H}, got {n_units}")
    top = gru.num_layers - 1
    units = torch.arange(H - n_units, H)
    r_rows, z_rows, n_rows = units, units + H, units + 2 * H
    decays = torch.tensor([1 - 1 / t for t in time_scales(n_units, min_tokens, max_tokens)])
    w_ih, w_hh = getattr(gru, f"weight_ih_l{top}"), getattr(gru, f"weight_hh_l{top}")
    b_ih, b_hh = getattr(gru, f"bias_ih_l{top}"), getattr(gru, f"bias_hh_l{top}")
    masks = {name: torch.ones_like(p) for name, p in
             (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh))}
    with torch.no_grad():
        for rows in (r_rows, z_rows, n_rows):
            w_hh[rows] = 0.0
            masks["w_hh"][rows] = 0.0
            b_hh[rows] = 0.0
            masks["b_hh"][rows] = 0.0
        for rows in (r_rows, z_rows):
            w_ih[rows] = 0.0
            masks["w_ih"][rows] = 0.0
            masks["b_ih"][rows] = 0.0
        b_ih[r_rows] = 0.0
        b_ih[z_rows] = torch.logit(decays).to(b_ih.dtype)
        if clock:
            # The first bag unit becomes a clock, c_t = 1 - prod(z): its value is a constant
            # 1 (tanh of a large bias), its decay reads only itself. The other bag units'
            # decays may read the clock, so they can learn to average over more tokens as a
            # text goes on (a running mean rather than a fixed window). Learned, from a start
            # that is the fixed-window case (zero weight on the clock).
            c = H - n_units
            b_ih[2 * H + c] = 6.0
            b_ih[H + c] = float(torch.logit(torch.tensor(1 - 1 / max_tokens)))
            masks["w_ih"][2 * H + c] = 0.0
            w_ih[2 * H + c] = 0.0
            masks["b_ih"][2 * H + c] = 0.0
            masks["w_hh"][z_rows, c] = 1.0
            masks["b_ih"][z_rows] = 1.0
    return [p.register_hook(lambda g, m=masks[name]: g * m.to(g.device)) for name, p in
            (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh))]


def decays_of(gru: nn.GRU, n_units: int) -> list[float]:
    """The decay each bag unit applies, read back from the weights (for reports and tests)."""
    H, top = gru.hidden_size, gru.num_layers - 1
    b = getattr(gru, f"bias_ih_l{top}")[H + H - n_units:2 * H] + \
        getattr(gru, f"bias_hh_l{top}")[H + H - n_units:2 * H]
    return [float(x) for x in torch.sigmoid(b.detach())]

