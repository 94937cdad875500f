"""HSNet's test episodes, drawn from its own list files as its test loop draws them.

HSNet (juhongm999/hsnet) evaluates 1,000 episodes per fold with NumPy's legacy generator seeded
0 (``np.random.seed(0)``) and no loader workers, so its episodes are a function of its list
files; they are reproduced here from the same files, which the user puts where ``hsnet_list``
says (docs/reference_behaviour.md, section 3.5):

- PASCAL-5i, ``data/splits/pascal/val/fold{n}.txt``: one ``{image name}__{class}`` line per
  (image, class), classes 1..20. Episode i takes line ``i mod n`` as its query and class.
- COCO-20i, ``data/splits/coco/val/fold{n}.pkl``: a pickled dict from the 0-based class id to
  its image names (``val2014/COCO_val2014_....jpg``). Each episode first draws its class
  uniformly among the fold's 20, then its query among that class's images.

Supports: ``shot`` draws from the class's images, each ``np.random.choice(names, 1,
replace=False)``, skipping the query; the same image may be drawn twice, as in HSNet. Paths:
PASCAL ``JPEGImages/{name}.jpg`` and ``SegmentationClassAug/{name}.png``; COCO ``{name}`` and
``annotations/{name}`` with ``.png``, relative to ``data_root``.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from dataset.episodes import Episode
from dataset.lists import Pair
from util.errors import DataError

HSNET_SEED = 0  # HSNet's test fixes every generator to 0


def read_pascal_list(path: Path) -> list[tuple[str, int]]:
    """(image name, class 1..20) per line of an HSNet PASCAL list."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name, sep, cls = line.partition("__")
        if not sep or not cls.isdigit() or not 1 <= int(cls) <= 20:
            raise DataError(f"{path}, line {number}: expected '<image name>__<class 1..20>' (an HSNet list), "
                            f"got {line!r}")
        entries.append((name, int(cls)))
    if not entries:
        raise DataError(f"{path} holds no episodes (an HSNet list has one '<name>__<class>' line per image)")
    return entries


class _ListsOnly(pickle.Unpickler):
    """Unpickles plain containers of names only: a list file must not run code."""

    def find_class(self, module: str, name: str):
        raise DataError(f"an HSNet COCO list holds only a dict of class ids to image names; this one needs "
                        f"{module}.{name}")


def read_coco_lists(path: Path) -> dict[int, list[str]]:
    """0-based class id -> image names of an HSNet COCO list (``fold{n}.pkl``)."""
    try:
        lists = _ListsOnly(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path} is not an HSNet COCO list ({err})") from None
    if not isinstance(lists, dict) or not all(isinstance(k, int) and isinstance(v, list) for k, v in lists.items()):
        raise DataError(f"{path} is not an HSNet COCO list: expected a dict of class ids to lists of image names")
    return lists


def _supports(rng: np.random.RandomState, names: list[str], query: str, shot: int) -> list[str]:
    if not any(n != query for n in names):
        raise DataError(f"the class of query {query} has no other image to draw a support from")
    drawn = []
    while len(drawn) < shot:
        name = rng.choice(names, 1, replace=False)[0]
        if name != query:
            drawn.append(str(name))
    return drawn


def pascal_episodes(entries: list[tuple[str, int]], shot: int, num_episodes: int) -> list[Episode]:
    rng = np.random.RandomState(HSNET_SEED)
    by_class: dict[int, list[str]] = {}
    for name, cls in entries:
        by_class.setdefault(cls, []).append(name)

    def pair(name: str) -> Pair:
        return (f"JPEGImages/{name}.jpg", f"SegmentationClassAug/{name}.png")

    episodes = []
    for index in range(num_episodes):
        query, cls = entries[index % len(entries)]
        episodes.append(Episode(pair(query), cls, [pair(s) for s in _supports(rng, by_class[cls], query, shot)]))
    return episodes


def coco_episodes(lists: dict[int, list[str]], novel: list[int], shot: int, num_episodes: int) -> list[Episode]:
    rng = np.random.RandomState(HSNET_SEED)
    class_ids = [c - 1 for c in novel]  # HSNet's 0-based ids, in its order (fold + 4 v)
    missing = [c for c in class_ids if not lists.get(c)]
    if missing:
        raise DataError(f"the HSNet COCO list has no images of classes {[c + 1 for c in missing]} of this fold")

    def pair(name: str) -> Pair:
        return (name, "annotations/" + name[:name.rindex(".")] + ".png")

    episodes = []
    for _ in range(num_episodes):
        cls = int(rng.choice(class_ids, 1, replace=False)[0])
        query = str(rng.choice(lists[cls], 1, replace=False)[0])
        episodes.append(Episode(pair(query), cls + 1, [pair(s) for s in _supports(rng, lists[cls], query, shot)]))
    return episodes


def hsnet_episodes(path: Path, data_set: str, novel: list[int], shot: int, num_episodes: int) -> list[Episode]:
    """The first ``num_episodes`` episodes of HSNet's test of the fold whose list is ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"hsnet_list {path} does not exist: HSNet's list files go there "
                                "(data/README.md says where they come from)")
    if data_set == "coco":
        return coco_episodes(read_coco_lists(path), novel, shot, num_episodes)
    entries = read_pascal_list(path)
    foreign = sorted({cls for _, cls in entries} - set(novel))
    if foreign:
        raise DataError(f"{path} lists classes {foreign}, which are not novel classes {novel} of this fold: "
                        "check that hsnet_list names the list of this fold")
    return pascal_episodes(entries, shot, num_episodes)
