"""Class names: ImageNet's (index, WordNet ID, label) table, or a dataset's folder names."""

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ImageNetClasses:
    labels: list[str]
    wnids: list[str | None]

    @classmethod
    def from_names(cls, names: list[str]) -> "ImageNetClasses":
        """Dataset folder names: WordNet IDs get their ImageNet label, other names are the label."""
        by_wnid = dict(zip(imagenet_classes().wnids, imagenet_classes().labels, strict=True))
        labels = [by_wnid.get(name, name) for name in names]
        return cls(labels, [name if WNID.match(name) else None for name in names])

    @classmethod
    def numbered(cls, count: int) -> "ImageNetClasses":
        return cls([f"class_{i}" for i in range(count)], [None] * count)


@cache
def imagenet_classes() -> ImageNetClasses:
    """The 1000 ILSVRC-2012 classes in the standard (sorted WordNet ID) output order."""
    text = resources.files("model_export").joinpath("imagenet_classes.tsv").read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    assert [int(r["index"]) for r in rows] == list(range(1000))
    return ImageNetClasses([r["name"] for r in rows], [r["wnid"] for r in rows])
