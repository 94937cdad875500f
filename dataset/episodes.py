"""Episode lists: which query, class and supports each test episode uses.

The reference draws episodes with Python's ``random`` inside the DataLoader workers, so they
change with the worker count. Here the whole list is drawn up front from one NumPy Generator
seeded with ``seed`` and consumed in a fixed order, then handed to the dataset as data (and
saved with the results so that a run can be repeated exactly, also across NumPy versions,
whose Generator streams are not guaranteed to stay the same).

Protocol kept from the reference (docs/reference_behaviour.md, section 1.1): queries in list order,
cycling until ``num_episodes``; the class is drawn uniformly among the novel classes present in
the query label (no pixel-count filter); ``shot`` supports are drawn without replacement from the
class's file list, never the query itself; supports are stored in the order the model sees them,
which is the REVERSE of the draw order (the reference builds the support tensor by prepending,
so index 0 is the last support drawn).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataset.lists import Pair, read_label
from util.errors import DataError

FORMAT = "eftnet-episodes/1"
log = logging.getLogger(__name__)


@dataclass
class Episode:
    query: Pair                # (image, label) paths, relative to data_root as stored
    class_id: int              # the novel class segmented in this episode
    supports: list[Pair]       # model order: supports[0] is the last one drawn


def make_episodes(data_list: list[Pair], sub_class_file_list: dict[int, list[Pair]],
                  novel: list[int], shot: int, num_episodes: int, seed: int,
                  label_reader: Callable[[str], np.ndarray] = read_label) -> list[Episode]:
    """Draw ``num_episodes`` episodes (see module doc); the result depends only on the inputs."""
    if not data_list:
        raise DataError("the data list is empty: no query images")
    if shot < 1 or num_episodes < 1:
        raise ValueError(f"shot and num_episodes must be >= 1, got {shot} and {num_episodes}")
    novel_set = set(novel)
    present: dict[Pair, list[int]] = {}  # query -> novel classes in its label, read once
    for i in range(min(num_episodes, len(data_list))):
        query = tuple(data_list[i])
        if query not in present:
            present[query] = sorted(novel_set.intersection(
                np.unique(label_reader(query[1])).tolist()))
        if not present[query]:
            raise DataError(f"data list entry {i} (line {i + 1}) {data_list[i][1]} holds none "
                             f"of the fold's novel classes {sorted(novel_set)}")
    pools: dict[int, list[Pair]] = {}  # class -> its file list as tuples, built once
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(num_episodes):
        query = tuple(data_list[e % len(data_list)])
        classes = present[query]
        class_id = classes[int(rng.integers(len(classes)))]
        if class_id not in pools:
            if class_id not in sub_class_file_list:
                raise DataError(f"class {class_id} (query {query[0]}) has no entry in the "
                                 "sub-class file list")
            pools[class_id] = [tuple(p) for p in sub_class_file_list[class_id]]
        pool = [p for p in pools[class_id] if p != query]
        if len(pool) < shot:
            raise DataError(f"class {class_id} has {len(pool)} support candidates besides the "
                             f"query {query[0]}, fewer than shot={shot}")
        drawn = [pool[j] for j in rng.choice(len(pool), size=shot, replace=False)]
        episodes.append(Episode(query, class_id, drawn[::-1]))
    return episodes


def save_episodes(path: str, episodes: list[Episode], meta: dict) -> None:
    """Write episodes and free-form metadata (seed, fold, shot, ...) as JSON, atomically (a
    temporary file renamed over ``path``), so that a kill never leaves a torn list."""
    doc = {"format": FORMAT, "meta": meta,
           "episodes": [{"query": list(e.query), "class_id": e.class_id,
                         "supports": [list(s) for s in e.supports]} for e in episodes]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def load_episodes(path: str) -> tuple[list[Episode], dict]:
    """Read a file written by save_episodes; returns (episodes, meta)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"episode file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"episode file {path} is not a text (JSON) file") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path} is not an episode file (expected format {FORMAT!r})")
    try:
        episodes = [Episode((e["query"][0], e["query"][1]), int(e["class_id"]),
                            [(s[0], s[1]) for s in e["supports"]]) for e in doc["episodes"]]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed episode entry ({err!r})") from None
    return episodes, doc.get("meta", {})


class EpisodeSampler:
    """Meta-training episodes: each query image once per epoch (shuffled), a base class of it
    drawn uniformly, ``shot`` other images of that class as supports (BAM's train mode).
    Indices refer to the data list; an image whose classes have too few images is no query."""

    def __init__(self, data_list: list[Pair], sub_lists: dict[int, list[Pair]], shot: int, batch: int):
        index = {pair: i for i, pair in enumerate(data_list)}
        self.pools = {}
        for c, pairs in sub_lists.items():
            missing = [p[0] for p in pairs if p not in index]
            if missing:
                raise DataError(f"class {c}: {missing[0]} is in the sub-class file list but not in the data list")
            self.pools[c] = np.array([index[p] for p in pairs], dtype=np.int64)
        self.classes: list[list[int]] = [[] for _ in data_list]  # usable classes of each query
        for c, pool in self.pools.items():
            if len(pool) > shot:  # the query itself is never its own support
                for i in pool:
                    self.classes[i].append(c)
        self.queries = np.array([i for i, cs in enumerate(self.classes) if cs], dtype=np.int64)
        if len(self.queries) < len(data_list):
            log.warning("%d of %d train images hold no base class with more than %d images and are "
                        "never queries", len(data_list) - len(self.queries), len(data_list), shot)
        if len(self.queries) < batch:
            raise DataError(f"batch_size {batch} exceeds the {len(self.queries)} usable query images")
        self.shot, self.batch = shot, batch
        self.steps_per_epoch = len(self.queries) // batch  # the last incomplete batch is dropped

    def support_pairs(self) -> list[tuple[int, int]]:
        """Every (image index, class) that can be drawn as a support."""
        return [(int(i), c) for c, pool in self.pools.items() if len(pool) > self.shot for i in pool]

    def epoch(self, rng: np.random.Generator):
        """Yields (queries [B], classes [B], supports [B, K]) index arrays."""
        order = rng.permutation(self.queries)
        for step in range(self.steps_per_epoch):
            queries = order[step * self.batch:(step + 1) * self.batch]
            classes = np.array([self.classes[q][rng.integers(len(self.classes[q]))] for q in queries])
            supports = np.stack([rng.choice(self.pools[c][self.pools[c] != q], self.shot, replace=False)
                                 for q, c in zip(queries, classes)])
            yield queries, classes, supports
