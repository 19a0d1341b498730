"""Model quality: the default GRU recipe on several seeds beside a TF-IDF linear baseline.

For each seed: train the default recipe (``model.train.TrainConfig()``, only the seed
changed) on that seed's split, score its test split after 10 %, 25 % and 100 % of each
text's tokens, and fit the baseline — TF-IDF over 1–2-grams with sublinear tf and a
LinearSVC, trained on the same split's train + validation documents — scored on the very
same prefixes (the model tokenizer's first tokens, rejoined). Writes
bench/results/quality-<date>.json (``bench.common.write_result``) and prints a line per seed.

    python -m bench.quality                 # seeds 0 1 2
    python -m bench.quality --jobs 2        # two seeds at a time (2 cores)
    python -m bench.quality --seeds 0 --epochs 4   # a quick look (not the recipe)
    python -m bench.quality --per-epoch     # also the test counts after every epoch
    python -m bench.quality --set train_on_val=false   # a recipe variant (exploration only)
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from bench.common import parser, write_result
from model import data
from model.evaluate import confusion_matrix, evaluate, macro_f1, prefix_index
from model.tokenizer import tokenize
from model.train import TrainConfig, evaluate_artifact, split_of, train

FRACTIONS = {"full": 1.0, "p25": 0.25, "p10": 0.1}


def baseline(split: data.Split) -> dict:
    """TF-IDF (1–2-grams, sublinear tf) + LinearSVC on train + val, scored on test prefixes."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC
    fit_docs = split.train + split.val
    t0, c0 = time.perf_counter(), time.process_time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, tokenizer=tokenize,
                          lowercase=False, token_pattern=None)
    clf = LinearSVC().fit(vec.fit_transform([d.text for d in fit_docs]),
                          [d.label for d in fit_docs])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    labels = list(clf.classes_)
    y = [d.label for d in split.test]
    tokens = [tokenize(d.text) for d in split.test]
    out: dict = {}
    for name, f in FRACTIONS.items():
        texts = [" ".join(t[: prefix_index(len(t), f) + 1]) for t in tokens]
        pred = list(clf.predict(vec.transform(texts)))
        out[name] = sum(p == t for p, t in zip(pred, y)) / len(y)
        if name == "full":
            idx = {l: i for i, l in enumerate(labels)}
            out["macro_f1"] = macro_f1(confusion_matrix([idx[t] for t in y], [idx[p] for p in pred],
                                                        len(labels)))
    return {**out, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "n_fit": len(fit_docs), "n_test": len(y)}


class EpochScores:
    """``train``'s per-epoch hook: the test split's counts right at 10 %, 25 % and 100 % after
    each epoch (analysis only: the recipe never sees them), and the time spent scoring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.labels, split = split_of(cfg)  # the split train() makes
        self.tokens = [tokenize(d.text) for d in split.test]
        self.ys = [self.labels.index(d.label) for d in split.test]
        self.xs: list[list[int]] | None = None  # encoded once: a run's vocab does not change
        self.device = cfg.device
        self.rows: list[dict] = []
        self.seconds = 0.0  # wall time; with one training thread about its CPU time too

    def __call__(self, epoch: int, model, vocab) -> None:
        t0 = time.perf_counter()
        if self.xs is None:
            self.xs = [vocab.encode(t) for t in self.tokens]
        acc = evaluate(model, self.xs, self.ys, self.labels,
                       device=self.device)["accuracy_at_fraction"]
        self.rows.append({"epoch": epoch, **{k: round(acc[f"{f:g}"] * len(self.ys))
                                             for k, f in FRACTIONS.items()}})
        self.seconds += time.perf_counter() - t0


def gru(seed: int, out_dir: Path, per_epoch: bool = False, **overrides) -> dict:
    cfg = TrainConfig(seed=seed, quiet=True, **overrides)
    hook = EpochScores(cfg) if per_epoch else None
    load0, t0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
    summary = train(cfg, out_dir, on_epoch=hook)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if hook is not None:  # training time without the scoring
        seconds, cpu = seconds - hook.seconds, cpu - hook.seconds
    load1 = os.getloadavg()
    report = evaluate_artifact(out_dir)
    acc = report["accuracy_at_prefix"]
    out = {"full": acc["1"], "p25": acc["0.25"], "p10": acc["0.1"], "macro_f1": report["macro_f1"],
           "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "loadavg_1m": [load0[0], load1[0]], "model_id": report["model_id"],
           "best_epoch": summary["best_epoch"], "average_from": cfg.average_from,
           "n_test": report["n"], "accuracy_at_prefix": acc}
    if hook is not None:
        out["test_counts_per_epoch"] = hook.rows
    return out


def at_least(model: dict, base: dict) -> dict[str, bool]:
    """Per prefix: the GRU is right on at least as many test documents as the baseline.
    Compared as counts: the GRU's accuracy is a float32 mean, the baseline's a float64 one,
    and the same count can differ in the last digits (0.97972971 against 0.97972973)."""
    n = base["n_test"]
    return {k: round(model[k] * n) >= round(base[k] * n) for k in FRACTIONS}


def _spread(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    return {"mean": round(statistics.mean(vals), 4),
            "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "min": round(min(vals), 4), "max": round(max(vals), 4)}


def _overrides(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` strings as TrainConfig overrides, each VALUE read as its field's type."""
    from model.__main__ import field_parser
    parsers = {f.name: field_parser(f) for f in fields(TrainConfig)}
    out: dict = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in parsers:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a TrainConfig field")
        out[name] = parsers[name](text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser("quality", __doc__, model=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (exploration only)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field, e.g. train_on_val=false (exploration only)")
    ap.add_argument("--keep", help="keep the artifacts under this directory (seed-N/)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds trained at once (training uses one thread; 2 on a 2-core box "
                         "halves the wall time, and each seed's seconds then include the sharing)")
    ap.add_argument("--per-epoch", action="store_true",
                    help="also score each seed's test split after every epoch (analysis only; "
                         "its time is left out of the seconds)")
    args = ap.parse_args(argv)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    overrides.update(_overrides(args.set))

    res: dict = {"recipe": {**asdict(TrainConfig()), **overrides},
                 "baseline_spec": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, "
                                  "tokenizer=model.tokenizer.tokenize) + LinearSVC(), fit on "
                                  "train + val", "seeds": []}
    docs = data.load_dataset(data.BBC)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            models = {seed: pool.submit(gru, seed, root / f"seed-{seed}", args.per_epoch,
                                        **overrides)
                      for seed in args.seeds}
            bases = {seed: baseline(data.split(docs, seed=seed)) for seed in args.seeds}
        for seed in args.seeds:
            base, model = bases[seed], models[seed].result()
            beats = at_least(model, base)
            res["seeds"].append({"seed": seed, "gru": model, "baseline": base, "gru_ge_baseline": beats})
            print(f"seed {seed}: gru full {model['full']:.3f} 25% {model['p25']:.3f} "
                  f"10% {model['p10']:.3f} F1 {model['macro_f1']:.3f} {model['seconds']:.0f}s "
                  f"(cpu {model['cpu_seconds']:.0f}s, load {model['loadavg_1m'][0]:.1f}"
                  f"->{model['loadavg_1m'][1]:.1f}) | baseline full {base['full']:.3f} "
                  f"25% {base['p25']:.3f} 10% {base['p10']:.3f} F1 {base['macro_f1']:.3f} "
                  f"{base['seconds']:.1f}s | gru >= baseline: {beats}", flush=True)
    rows = res["seeds"]
    res["summary"] = {who: {k: _spread([r[who] for r in rows], k)
                            for k in (*FRACTIONS, "macro_f1", "seconds")}
                      for who in ("gru", "baseline")}
    res["all_seeds_ge_baseline"] = all(all(r["gru_ge_baseline"].values()) for r in rows)
    write_result("quality", res, args.out)
    return 0 if res["all_seeds_ge_baseline"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
