"""Command line: ``python -m model train | eval | predict | import-keras``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import Field, fields

from . import artifact, data
from .keras_import import KerasImportError, import_keras, read_labels
from .train import TrainConfig, evaluate_artifact, train


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_parser(field: Field) -> Callable[[str], object]:
    """How a TrainConfig field's value is read from text (the CLI's flags, bench's --set)."""
    return {"int": int, "float": float, "str": str, "int | None": int,
            "bool": _boolean}.get(str(field.type), str)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=data.BBC,
                   help="'bbc-news' or a PATH.csv / PATH.jsonl of your own")
    p.add_argument("--out", required=True, help="artifact directory to write")
    for f in fields(TrainConfig):
        if f.name in ("dataset", "quiet"):
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=field_parser(f), default=f.default, help=f"(default: {f.default})")
    p.add_argument("--quiet", action="store_true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train_args(sub.add_parser("train", help="train a classifier and write an artifact"))
    ev = sub.add_parser("eval", help="evaluate an artifact on its recorded test split")
    ev.add_argument("--model", required=True)
    ev.add_argument("--dataset", default=None, help="override the dataset recorded in the artifact")
    pr = sub.add_parser("predict", help="classify text read from stdin, print JSON")
    pr.add_argument("--model", required=True)
    kx = sub.add_parser("import-keras", help="convert a Keras Embedding->GRU->Dense model")
    kx.add_argument("keras_file", help="a Keras 3 .keras file or a legacy .h5 file")
    kx.add_argument("--vocab", required=True,
                    help="token-per-line file (line i = id i), JSON list, or JSON token->id map")
    kx.add_argument("--labels", required=True,
                    help="comma-separated class names in output order, or a file of them")
    kx.add_argument("--unk-token", help="the out-of-vocabulary token (default: detect [UNK], <OOV>, ...)")
    kx.add_argument("--out", required=True, help="artifact directory to write")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "train":
            cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
            summary = train(cfg, args.out)
            print(json.dumps({k: v for k, v in summary.items()}, default=str))
        elif args.cmd == "eval":
            report = evaluate_artifact(args.model, args.dataset)
            print(json.dumps({k: report[k] for k in ("model_id", "test_accuracy",
                                                     "accuracy_at_prefix", "macro_f1")}, indent=2))
        elif args.cmd == "predict":
            clf = artifact.load(args.model)
            probs = clf.classify_text(sys.stdin.read())
            label = max(probs, key=probs.get)
            print(json.dumps({"label": label, "confidence": probs[label], "probs": probs,
                              "model_id": clf.model_id}))
        elif args.cmd == "import-keras":
            model_id = import_keras(args.keras_file, args.vocab, read_labels(args.labels),
                                    args.out, args.unk_token)
            print(json.dumps({"model_id": model_id, "out": args.out}))
    except (artifact.ArtifactError, data.DatasetError, KerasImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
