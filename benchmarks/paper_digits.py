"""The paper's two measured claims on scikit-learn's digits, from trained checkpoints. Prints JSON.

- Feature search (Figure 4): the share of an image's k nearest gallery images (Euclidean distance of
  fc7 vectors, ten-crop mean; FAISS exact index) that share its class: gallery = the training
  split, queries = the validation split.
- Ensembles (the 5-CNN average): ten-crop top-1 of each member and of their ensemble (one ONNX graph)
  on the validation and held-out splits, and the inference cost per image of each.

    python tests/digits.py /tmp/digits
    alexnet-train /tmp/digits --out runs/s0 --seed 0 --input-size 64 --resize-size 73 --no-flip ...
    python -m benchmarks.paper_digits /tmp/digits runs/s0/checkpoint.pt runs/s1/checkpoint.pt ... --out r.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import faiss
import numpy as np

from alexnet_core.session import OnnxClassifier
from benchmarks.inference import median_ms
from benchmarks.report import add_out_option, write_report
from model_export.ensemble import build_ensemble
from model_export.export import export_onnx
from model_export.weights import load_checkpoint

CPU = ["CPUExecutionProvider"]


def split(root: Path, name: str, per_class: int | None = None) -> list[tuple[Path, int]]:
    """(file, digit) of a split, the first ``per_class`` files of each digit if given."""
    return [
        (p, int(d.name)) for d in sorted((root / name).iterdir()) for p in sorted(d.glob("*.png"))[:per_class]
    ]


def features(classifier: OnnxClassifier, images: list[tuple[Path, int]], chunk: int = 32) -> np.ndarray:
    crops = inputs(classifier, images)
    return np.concatenate(
        [classifier.features(np.concatenate(crops[i : i + chunk])) for i in range(0, len(crops), chunk)]
    )


def inputs(classifier: OnnxClassifier, images: list[tuple[Path, int]]) -> list[np.ndarray]:
    """Each image's model input, through the service's own preprocessing."""
    return [classifier.metadata.preprocess(p.read_bytes(), max_pixels=10**7).batch for p, _ in images]


def correct(classifier: OnnxClassifier, crops: list[np.ndarray], labels: list[int]) -> np.ndarray:
    """Per image: is the ten-crop top-1 class the true one."""
    predicted = [int(classifier.probabilities(c).argmax()) for c in crops]
    names = classifier.metadata.labels
    return np.array([int(names[p]) == y for p, y in zip(predicted, labels, strict=True)])


def changes(member: np.ndarray, ensemble: np.ndarray) -> dict[str, int]:
    """Images the ensemble gets right that the member got wrong, and the reverse: on small splits
    these counts say more than the difference of two top-1 fractions."""
    return {
        "wrong_to_right": int((~member & ensemble).sum()),
        "right_to_wrong": int((member & ~ensemble).sum()),
    }


def cost_ms(classifier: OnnxClassifier, crops: list[np.ndarray], batch: int = 8, repeats: int = 5) -> float:
    """Median inference time per image, in batches of ``batch`` images (as the batcher sends them)."""
    chunk = np.concatenate(crops[:batch])
    return median_ms(lambda: classifier.probabilities(chunk), repeats, per=batch)


def neighbours(classifier: OnnxClassifier, root: Path, k: int, per_class: int | None) -> dict[str, float]:
    gallery, queries = split(root, "train", per_class), split(root, "val", per_class)
    index = faiss.IndexFlatL2(4096)
    index.add(features(classifier, gallery))
    probes = features(classifier, queries)
    _, found = index.search(probes, k)
    gallery_labels = np.array([y for _, y in gallery])
    query_labels = np.array([y for _, y in queries])
    same = gallery_labels[found] == query_labels[:, None]
    return {"k": k, "share_of_k_nearest_same_class": round(float(same.mean()), 4),
            "nearest_same_class": round(float(same[:, 0].mean()), 4),
            "gallery": len(gallery), "queries": len(queries)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="the digits folder (tests/digits.py)")
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--per-class", type=int, help="at most this many images per digit and split (default all)")
    p.add_argument("--no-ensemble", action="store_true", help="members and feature search only")
    p.add_argument("--input-size", type=int, default=64, help="as trained (default 64)")
    p.add_argument("--resize-size", type=int, default=73, help="as trained (default 73)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cost figure, median (default 5)")
    add_out_option(p)
    args = p.parse_args(argv)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, checkpoint in enumerate(args.checkpoints):
            paths.append(Path(tmp) / f"m{i}.onnx")
            export_onnx(load_checkpoint(checkpoint), paths[-1], input_size=args.input_size,
                        resize_size=args.resize_size, features=True)  # fmt: skip
        first = OnnxClassifier(paths[0], CPU)
        out["feature_search"] = neighbours(first, args.data, args.k, args.per_class)
        members = [first] + [OnnxClassifier(x, CPU) for x in paths[1:]]
        splits = {name: split(args.data, name, args.per_class) for name in ("val", "held_out")}
        crops = {name: inputs(first, images) for name, images in splits.items()}
        labels = {name: [y for _, y in images] for name, images in splits.items()}

        def right(c: OnnxClassifier) -> dict[str, np.ndarray]:
            return {n: correct(c, crops[n], labels[n]) for n in crops}

        def scores(c: OnnxClassifier, hits: dict[str, np.ndarray]) -> dict[str, object]:
            return {f"{n}_top1": round(float(h.mean()), 4) for n, h in hits.items()} | {
                "ms_per_image": cost_ms(c, crops["val"], repeats=args.repeats)
            }

        member_hits = [right(m) for m in members]
        out["members"] = [
            {"checkpoint": str(c), **scores(m, h)}
            for c, m, h in zip(args.checkpoints, members, member_hits, strict=True)
        ]
        if len(paths) > 1 and not args.no_ensemble:
            build_ensemble(paths, Path(tmp) / "ensemble.onnx", "ensemble")
            ensemble = OnnxClassifier(Path(tmp) / "ensemble.onnx", CPU)
            hits = right(ensemble)
            out["ensemble"] = scores(ensemble, hits) | {
                f"{n}_against_members": [changes(h[n], hits[n]) for h in member_hits] for n in hits
            }
        out["images"] = {n: len(v) for n, v in splits.items()}
    write_report(json.dumps(out, indent=2), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
