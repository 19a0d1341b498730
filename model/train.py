"""Prefix-aware training.

The loss is cross-entropy at every real position of every text, so the model learns to
classify a stream after its first sentences, not just at the end. Training sequences are
cut to ``max_train_tokens`` (the prefix: that is what a stream shows first); evaluation
always reads whole texts. The saved weights are the mean of the weights at the end of each
epoch from ``average_from`` on (weight averaging, as in SWA): picking one epoch by its
validation score chose among epochs that 223 validation texts cannot tell apart. As nothing
is then selected on the validation texts, they are trained on too (``train_on_val``), as the
TF-IDF baseline of bench/quality.py is. With ``average_from = 0`` the epoch with the best
validation score is kept (it weighs early prefixes as well as the full text), and the
validation texts must be held out (``train_on_val = False``).

The default recipe (BBC News, one CPU thread, 2-4 minutes by the machine): 256-wide embeddings
initialised from the training texts' own co-occurrence statistics (model/embeddings.py), a
GRU of 160 units of which 33 are bag units (model/bag.py: a learned clock and 32 running
averages of token values, so the head sees the whole text's topic at any prefix), 32 mean
units beside it (model/gru.py: the exact running mean of learned token vectors, fitted first
on their own as a streamed linear bag-of-words classifier, then fixed), a
one-cycle learning rate over 12 epochs, 20% of training tokens replaced by ``<unk>``, an
exponential moving average of the weights, and the mean of those averages over epochs 6-12
saved, trained on the train and validation texts of the split (1,781 of BBC's 2,225).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from . import artifact, bag, data, embeddings
from .evaluate import evaluate
from .gru import GRUClassifier, ModelConfig
from .tokenizer import UNK_ID, Vocab, tokenize


@dataclass
class TrainConfig:
    dataset: str = data.BBC
    text_field: str = "text"
    label_field: str = "label"
    seed: int = 0
    min_freq: int = 2
    max_vocab: int | None = None
    embed_dim: int = 256
    hidden_size: int = 160  # bag units included
    num_layers: int = 1
    dropout: float = 0.3
    epochs: int = 12
    patience: int = 12  # the one-cycle schedule runs its epochs; val picks the best
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    max_train_tokens: int = 300
    word_dropout: float = 0.2  # training only: replace this share of input tokens by <unk>
    crop_prob: float = 0.0  # training only: share of long texts read from a random window
    carry_state: int = 0  # 1: a random window starts from the state its preceding tokens give
    schedule: str = "onecycle"  # const | onecycle | cosine (per batch, with warmup)
    warmup: float = 0.1  # share of the steps spent warming up (onecycle, cosine)
    label_smoothing: float = 0.0
    loss_ramp: int = 0  # weight of position t is min(1, (t + 1) / loss_ramp); 0: uniform
    init: str = "default"  # default | orthogonal (GRU recurrent weights)
    embed_init: str = "ppmi_svd"  # ppmi_svd (word vectors from the training texts) | random
    embed_window: int = 5  # ppmi_svd: co-occurrence window
    head_hidden: int = 0  # > 0: a ReLU layer of this width before the output layer
    bag_units: int = 33  # of hidden_size, tied to running averages of token vectors (model/bag.py)
    bag_min_tokens: float = 8.0  # the bag units' averaging windows, geometric between these
    bag_max_tokens: float = 400.0
    bag_clock: bool = True  # the bag units' windows grow with a learned clock (model/bag.py)
    # > 0: mean units (model/gru.py), an exact running mean of learned token vectors of this
    # width beside the GRU; fitted first with a head of their own (a streamed linear
    # bag-of-words model) for ``mean_epochs``, then fixed while the GRU trains
    mean_dim: int = 32
    mean_epochs: int = 8
    mean_lr: float = 1e-2
    ema: float = 0.99  # > 0: validate and keep an exponential moving average of the weights
    # > 0: keep the mean of the (EMA) weights at the end of every epoch from this one on
    # (weight averaging, as SWA), instead of the epoch the validation score picks
    average_from: int = 6
    # True: the validation texts are trained on too, as the baseline's are (bench/quality.py).
    # Weight averaging selects nothing on them, so holding them out only costs data; needs
    # average_from > 0. False: they are held out and scored at every epoch's end.
    train_on_val: bool = True
    device: str = "cpu"
    # One thread: a rerun on the same machine gives the same model_id (not across CPUs: their
    # kernels round differently), and no spinning under load.
    threads: int | None = 1
    limit: int | None = None  # keep only N documents per label before splitting (quick runs)
    quiet: bool = False


def _progress(prefix: str, done: int, total: int, extra: str, quiet: bool) -> None:
    if quiet:
        return
    width = 28
    filled = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}{end}")
    sys.stderr.flush()


def _batches(seqs: Sequence[list[int]], targets: Sequence[int], batch_size: int,
             rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches in random order: little padding, still shuffled."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(idx: list[int], seqs: Sequence[list[int]], targets: Sequence[int],
             max_len: int, starts: Sequence[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    starts = starts or [0] * len(idx)
    lens = [min(max(1, len(seqs[i]) - st), max_len) for i, st in zip(idx, starts)]
    ids = torch.zeros(len(idx), max(lens), dtype=torch.long)
    for row, (i, st) in enumerate(zip(idx, starts)):
        s = seqs[i][st:st + max_len]
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor(lens), torch.tensor([targets[i] for i in idx])


def _prefix_state(model: GRUClassifier, idx: list[int], seqs: Sequence[list[int]],
                  starts: Sequence[int]) -> torch.Tensor | None:
    """The GRU state after each text's first ``starts[row]`` tokens (zeros where 0), no grad."""
    if not any(starts):
        return None
    rows = [r for r, st in enumerate(starts) if st > 0]
    pre = torch.zeros(len(rows), max(starts[r] for r in rows), dtype=torch.long)
    for k, r in enumerate(rows):
        pre[k, : starts[r]] = torch.tensor(seqs[idx[r]][: starts[r]], dtype=torch.long)
    dev = model.head.weight.device
    h0 = model.initial_state(len(idx), device=dev)
    with torch.no_grad():
        packed = pack_padded_sequence(model.embed(pre.to(dev)), torch.tensor([starts[r] for r in rows]),
                                      batch_first=True, enforce_sorted=False)
        _, h_rows = model.gru(packed)
    h0[:, rows] = h_rows
    return h0


def _word_dropout(ids: torch.Tensor, p: float) -> torch.Tensor:
    """Training only: each real token becomes ``<unk>`` with probability ``p``."""
    if p <= 0:
        return ids
    return ids.masked_fill((torch.rand(ids.shape) < p) & (ids > 0), UNK_ID)


def _real_positions(lens: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) float mask: 1 at each row's real positions, 0 at its padding."""
    return (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).float()


def _position_loss(loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """The loss at every position of (B, T, C) logits against each row's label, averaged
    with (B, T) position weights (the real-position mask, maybe ramped)."""
    B, T, C = logits.shape
    per_pos = loss_fn(logits.reshape(-1, C), y.repeat_interleave(T)).view(B, T)
    return (per_pos * weights).sum() / weights.sum()


def fit_mean_units(model: GRUClassifier, tr_x: Sequence[list[int]], tr_y: Sequence[int],
                   cfg: TrainConfig, rng: random.Random) -> None:
    """Fit the mean units with a head of their own, then fix them (no grad) and give the
    model's head that head's weights: the GRU then trains beside a streamed linear
    bag-of-words model instead of learning one from scratch.

    Same batches, prefixes and word dropout as the GRU's training, loss at every position:
    the running mean after t tokens is what the head reads after t tokens.
    """
    H, M = model.config.hidden_size, model.config.mean_dim
    table = model.mean_embed.weight
    head = nn.Linear(M, model.config.num_labels).to(table.device)
    opt = torch.optim.Adam([table, *head.parameters()], lr=cfg.mean_lr)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for _ in range(cfg.mean_epochs):
        for idx in _batches(tr_x, tr_y, cfg.batch_size, rng):
            ids, lens, y = _collate(idx, tr_x, tr_y, cfg.max_train_tokens)
            ids = _word_dropout(ids, cfg.word_dropout)
            ids, lens, y = ids.to(table.device), lens.to(table.device), y.to(table.device)
            logits = head(model.running_means(ids))  # (B, T, C)
            loss = _position_loss(loss_fn, logits, y, _real_positions(lens, ids.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    table.requires_grad_(False)
    with torch.no_grad():
        model.head.weight[:, H:H + M] = head.weight
        model.head.bias.copy_(head.bias)


def _val_score(report: dict) -> float:
    acc = report["accuracy_at_fraction"]
    return (acc["0.1"] + acc["0.25"] + 2 * acc["1"]) / 4


def split_of(cfg: TrainConfig) -> tuple[list[str], data.Split]:
    """The labels and the train / validation / test split a run of ``cfg`` uses."""
    docs = data.load_dataset(cfg.dataset, cfg.text_field, cfg.label_field)
    if cfg.limit:
        docs = data.per_label(docs, cfg.limit, seed=cfg.seed)
    return data.labels_of(docs), data.split(docs, seed=cfg.seed)


def train(cfg: TrainConfig, out_dir: str | Path,
          on_epoch: Callable[[int, GRUClassifier, Vocab], None] | None = None) -> dict:
    """Train, save the kept weights as an artifact in ``out_dir`` and return its summary.
    ``on_epoch(epoch, model, vocab)``, if given, sees the weights validated at each epoch's
    end (for analysis: ``bench/quality.py --per-epoch`` scores its test split there)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.average_from < 0:
        raise ValueError(f"average_from must be >= 0, got {cfg.average_from}")
    if cfg.mean_dim < 0 or (cfg.mean_dim and cfg.mean_epochs < 1):
        raise ValueError(f"mean units need mean_dim >= 0 and, if > 0, mean_epochs >= 1 "
                         f"(got {cfg.mean_dim} and {cfg.mean_epochs})")
    if cfg.train_on_val and not cfg.average_from:
        raise ValueError("train_on_val needs average_from > 0: keeping the best epoch selects "
                         "on the validation texts, so they must be held out")
    if cfg.train_on_val and cfg.average_from > cfg.epochs:
        raise ValueError(f"train_on_val keeps the mean of epochs {cfg.average_from}..{cfg.epochs}: "
                         "none; lower average_from or hold the validation texts out")
    if cfg.mean_dim and cfg.carry_state:
        raise ValueError("carry_state does not carry the mean units' state: use mean_dim 0")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    labels, split = split_of(cfg)
    label_id = {l: i for i, l in enumerate(labels)}

    if not cfg.train_on_val and not cfg.average_from and not split.val:
        raise ValueError("no validation texts to pick the best epoch on: use more documents "
                         "or average_from > 0")
    fit_docs = split.train + split.val if cfg.train_on_val else split.train
    held_out = [] if cfg.train_on_val else split.val
    train_tokens = [tokenize(d.text) for d in fit_docs]
    vocab = Vocab.build(train_tokens, min_freq=cfg.min_freq, max_size=cfg.max_vocab)
    tr_x = [vocab.encode(t) for t in train_tokens]
    tr_y = [label_id[d.label] for d in fit_docs]
    va_x = [vocab.encode(tokenize(d.text)) for d in held_out]
    va_y = [label_id[d.label] for d in held_out]

    mconf = ModelConfig(len(vocab), len(labels), cfg.embed_dim, cfg.hidden_size, cfg.num_layers,
                        cfg.dropout, head_hidden=cfg.head_hidden, mean_dim=cfg.mean_dim)
    model = GRUClassifier(mconf).to(cfg.device)
    if cfg.init == "orthogonal":
        H = cfg.hidden_size
        for name, p in model.gru.named_parameters():
            if name.startswith("weight_hh"):
                for g in range(3):
                    nn.init.orthogonal_(p.data[g * H:(g + 1) * H])
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(p.data)
            elif name.startswith("bias"):
                nn.init.zeros_(p.data)
    if cfg.bag_units:
        if cfg.weight_decay:
            raise ValueError("bag units need weight_decay 0: decay would move their tied weights")
        bag.tie(model.gru, cfg.bag_units, cfg.bag_min_tokens, cfg.bag_max_tokens, cfg.bag_clock)
    init_seconds = 0.0
    if cfg.embed_init == "ppmi_svd":
        t_init = time.time()
        with torch.no_grad():
            model.embed.weight.copy_(embeddings.ppmi_svd(tr_x, len(vocab), cfg.embed_dim,
                                                         window=cfg.embed_window, seed=cfg.seed))
        init_seconds = time.time() - t_init
    elif cfg.embed_init != "random":
        raise ValueError(f"unknown embed_init {cfg.embed_init!r}")
    mean_seconds = 0.0
    if cfg.mean_dim:
        t_mean = time.time()
        fit_mean_units(model, tr_x, tr_y, cfg, rng)
        mean_seconds = time.time() - t_mean
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(tr_x) / cfg.batch_size)
    total_steps = cfg.epochs * n_batches
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=cfg.warmup)
    elif cfg.schedule == "cosine":
        warm = max(1, int(cfg.warmup * total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, total_steps - warm)))))
    elif cfg.schedule == "const":
        sched = None
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing)
    log = lambda msg: None if cfg.quiet else print(msg, file=sys.stderr, flush=True)
    held = (f"{len(split.val)} of them the validation texts" if cfg.train_on_val
            else f"{len(split.val)} validation texts held out")
    log(f"train: {len(fit_docs)} docs ({held}), test {len(split.test)}, "
        f"vocab {len(vocab)}, labels {labels}, device {cfg.device}, "
        f"embedding init {cfg.embed_init} ({init_seconds:.1f}s), "
        f"mean units {cfg.mean_dim} ({mean_seconds:.1f}s)")

    params = [p for p in model.parameters()]
    # The average needs a few time constants (1 / (1 - ema) steps) to forget the initial
    # weights; a run shorter than five of them keeps the plain weights.
    use_ema = cfg.ema > 0 and total_steps >= 5 / (1 - cfg.ema)
    if cfg.ema > 0 and not use_ema:
        log(f"ema off: {total_steps} steps is too short for ema {cfg.ema}")
    ema_params = [p.detach().clone() for p in params] if use_ema else None
    best_score, best_state, best_epoch, history, stale = -1.0, None, 0, [], 0
    mean_state: dict | None = None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = _batches(tr_x, tr_y, cfg.batch_size, rng)
        total_loss = correct = count = 0.0
        for b, idx in enumerate(batches, start=1):
            starts = [rng.randrange(len(tr_x[i]) - cfg.max_train_tokens + 1)
                      if len(tr_x[i]) > cfg.max_train_tokens and rng.random() < cfg.crop_prob
                      else 0 for i in idx]
            ids, lens, y = _collate(idx, tr_x, tr_y, cfg.max_train_tokens, starts)
            h0 = _prefix_state(model, idx, tr_x, starts) if cfg.carry_state else None
            ids = _word_dropout(ids, cfg.word_dropout)
            ids, lens, y = ids.to(cfg.device), lens.to(cfg.device), y.to(cfg.device)
            logits = model(ids, h0=h0)  # (B, T, C)
            T = ids.shape[1]
            mask = _real_positions(lens, T)
            if cfg.loss_ramp > 0:
                pos = torch.tensor(starts, device=ids.device)[:, None] + torch.arange(T, device=ids.device)
                mask = mask * ((pos + 1).float() / cfg.loss_ramp).clamp(max=1.0)
            loss = _position_loss(loss_fn, logits, y, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if sched is not None:
                sched.step()
            if ema_params is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - cfg.ema)
            last = logits[torch.arange(len(idx)), lens - 1].argmax(-1)
            total_loss += loss.item() * len(idx)
            correct += float((last == y).sum())
            count += len(idx)
            _progress(f"epoch {epoch:2d}", b, len(batches), f"loss {total_loss / count:.4f}", cfg.quiet)
        if ema_params is not None:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, ema_params):
                    p.copy_(e)
        if on_epoch is not None:
            on_epoch(epoch, model, vocab)
        row = {"epoch": epoch, "train_loss": total_loss / count, "train_acc_prefix": correct / count}
        line = f"epoch {epoch:2d}: loss {total_loss / count:.4f}  train acc {correct / count:.3f}"
        if va_x:
            report = evaluate(model, va_x, va_y, labels, device=cfg.device)
            acc, score = report["accuracy_at_fraction"], _val_score(report)
            row.update(val=acc, val_score=score)
            line += f"  val acc {acc['1']:.3f} (10% {acc['0.1']:.3f}, 25% {acc['0.25']:.3f})"
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(row)
        log(f"{line}  {time.time() - t0:.0f}s")
        if cfg.average_from and epoch >= cfg.average_from:
            k = epoch - cfg.average_from  # epochs already in the mean
            if mean_state is None:
                mean_state = {n: v.detach().clone() for n, v in model.state_dict().items()}
            else:
                for n, v in model.state_dict().items():
                    if v.is_floating_point():  # lerp: an entry equal in every epoch stays exact
                        mean_state[n].lerp_(v.detach(), 1 / (k + 1))
        if ema_params is not None:
            with torch.no_grad():
                for p, l in zip(params, live):
                    p.copy_(l)
        if va_x and best_epoch != epoch:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop: no val improvement for {cfg.patience} epochs")
                break
    if mean_state is not None:  # every epoch from average_from to the last one run
        best_state, best_epoch = mean_state, len(history)
    assert best_state is not None
    model.load_state_dict(best_state)
    val = history[best_epoch - 1].get("val")
    if mean_state is not None and va_x:  # the mean's own scores, not its last epoch's
        report = evaluate(model, va_x, va_y, labels, device=cfg.device)
        val, best_score = report["accuracy_at_fraction"], _val_score(report)
        log(f"kept the mean of epochs {cfg.average_from}..{best_epoch}: val acc {val['1']:.3f} "
            f"(10% {val['0.1']:.3f}, 25% {val['0.25']:.3f})")
    elif mean_state is not None:
        best_score = None
        log(f"kept the mean of epochs {cfg.average_from}..{best_epoch} (no texts held out)")
    model.cpu().eval()
    seconds = time.time() - t0
    training = {**asdict(cfg), "best_epoch": best_epoch, "best_val_score": best_score,
                "kept": "mean" if mean_state is not None else "best",
                "train_seconds": round(seconds, 1), "split": split.ids(), "history": history}
    prior = {l: sum(1 for y in tr_y if y == label_id[l]) / len(tr_y) for l in labels}
    model_id = artifact.save(out_dir, model, vocab, labels, training, label_prior=prior)
    log(f"saved {out_dir} (model_id {model_id}, best epoch {best_epoch}, {seconds:.0f}s)")
    return {"model_id": model_id, "best_epoch": best_epoch, "seconds": seconds, "val": val}


def evaluate_artifact(model_dir: str | Path, dataset: str | None = None,
                      text_field: str = "text", label_field: str = "label") -> dict:
    """Score an artifact on the test split recorded in its config; write eval.json and the plot."""
    clf = artifact.load(model_dir)
    tr = clf.config.get("training", {})
    docs = data.load_dataset(dataset or tr.get("dataset", data.BBC),
                             tr.get("text_field", text_field), tr.get("label_field", label_field))
    test_ids = tr.get("split", {}).get("test")
    if test_ids is None:
        test = data.split(docs, seed=tr.get("seed", 0)).test
    else:
        by_id = {d.doc_id: d for d in docs}
        missing = [i for i in test_ids if i not in by_id]
        if missing:
            raise data.DatasetError(f"{len(missing)} test documents of the recorded split are not "
                                    f"in the dataset (first: {missing[0]!r})")
        test = [by_id[i] for i in test_ids]
    label_id = {l: i for i, l in enumerate(clf.labels)}
    xs = [clf.encode(tokenize(d.text)) for d in test]
    ys = [label_id[d.label] for d in test]
    fractions = tuple(round(f, 2) for f in [0.05 * k for k in range(1, 21)])
    report = evaluate(clf.model, xs, ys, clf.labels, fractions=fractions)
    curve = report.pop("accuracy_at_fraction")
    report = {
        "model_id": clf.model_id,
        "test_accuracy": curve["1"],
        "accuracy_at_prefix": {k: curve[k] for k in ("0.1", "0.25", "0.5", "0.75", "1")},
        "accuracy_curve": curve,
        **report,
        "test_doc_ids": [d.doc_id for d in test],
    }
    out = Path(model_dir)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_curve(curve, out / "accuracy_vs_prefix.png", clf.model_id)
    return report


def _plot_curve(curve: dict[str, float], path: Path, model_id: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping accuracy_vs_prefix.png", file=sys.stderr)
        return
    xs = [100 * float(k) for k in curve]
    ys = list(curve.values())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("% of the text's tokens read")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy vs prefix (model {model_id})")
    ax.set_ylim(min(0.5, math.floor(min(ys) * 10) / 10), 1.0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
