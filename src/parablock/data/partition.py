"""Federated partitions: which examples each client holds, their statistics, and a plot.

``data.partition`` picks a registered partition: ``iid`` (a seeded shuffle, sizes equal or in
proportion to ``data.client_weights``), ``dirichlet`` (for every label, the clients' shares are
drawn from Dirichlet(``data.alpha``): small alpha gives each client few labels and unequal sizes,
large alpha approaches IID), ``by_label`` (each label lives on exactly one client) and
``replicate`` (every client holds everything: for tests and ablations). Labels are the
reasoning-gym task or template, the file name, or ``data.label_field`` of each record.

``per_client`` splits nothing: each client loads its own source from ``data.client_sources``
(``sources.client_records``), so a simulated run and a networked run where every client reads its
own file see the same data. The runner builds those clients' data itself; the registered
function only refuses to split one pooled list.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parablock.data.examples import DataError, Example
from parablock.registry import Registry

log = logging.getLogger(__name__)

_EMPTY_HINT = "use fewer clients or more data"


@dataclass(frozen=True)
class PartitionSettings:
    clients: int
    seed: int
    alpha: float = 0.5
    weights: tuple[float, ...] = ()  # relative client sizes for iid; () = equal


Partition = Callable[[list[str], PartitionSettings], list[list[int]]]
PARTITIONS: Registry[Partition] = Registry("partition")


def _check_nonempty(parts: list[list[int]], what: str, hint: str = _EMPTY_HINT) -> None:
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise DataError(f"{what} leaves client(s) {empty} with no examples; {hint}")


@PARTITIONS.register("iid")
def iid(labels: list[str], s: PartitionSettings) -> list[list[int]]:
    n = len(labels)
    if n < s.clients:
        raise DataError(f"{n} examples cannot give each of {s.clients} clients one; {_EMPTY_HINT}")
    perm = np.random.default_rng([s.seed, 7]).permutation(n)
    if not s.weights:
        chunks = np.array_split(perm, s.clients)
    else:
        w = np.asarray(s.weights, dtype=float)
        cuts = np.round(np.cumsum(w / w.sum())[:-1] * n).astype(int)
        chunks = np.split(perm, cuts)
    parts = [sorted(int(i) for i in c) for c in chunks]
    _check_nonempty(parts, f"data.partition=iid with data.client_weights={list(s.weights)}")
    return parts


@PARTITIONS.register("dirichlet")
def dirichlet(labels: list[str], s: PartitionSettings) -> list[list[int]]:
    """Per label, client shares ~ Dir(alpha); redrawn (seeded) until no client is empty."""
    rng = np.random.default_rng([s.seed, 23])
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    for attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(s.clients)]
        for lab in sorted(by_label):
            idx = rng.permutation(by_label[lab])
            shares = rng.dirichlet(np.full(s.clients, s.alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if all(parts):
            if attempt:
                log.info("dirichlet partition: redrew %d time(s) to leave no client empty", attempt)
            return [sorted(p) for p in parts]
    _check_nonempty(
        parts,
        f"data.partition=dirichlet (alpha={s.alpha:g}, {len(labels)} examples, "
        f"{len(by_label)} labels, 100 draws)",
        f"{_EMPTY_HINT}, or a larger data.alpha",
    )
    raise AssertionError("unreachable")


@PARTITIONS.register("by_label")
def by_label(labels: list[str], s: PartitionSettings) -> list[list[int]]:
    """Each label on one client; labels go largest first to the client holding fewest examples."""
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    if len(groups) < s.clients:
        raise DataError(
            f"data.partition=by_label: {len(groups)} label(s) for {s.clients} clients leaves "
            f"a client with no examples; {_EMPTY_HINT} labels (or data.partition=dirichlet)"
        )
    parts: list[list[int]] = [[] for _ in range(s.clients)]
    for lab in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        target = min(range(s.clients), key=lambda c: (len(parts[c]), c))
        parts[target].extend(groups[lab])
    return [sorted(p) for p in parts]


@PARTITIONS.register("replicate")
def replicate(labels: list[str], s: PartitionSettings) -> list[list[int]]:
    """Every client holds all data (tests: staleness alone then changes nothing)."""
    return [list(range(len(labels))) for _ in range(s.clients)]


@PARTITIONS.register("per_client")
def per_client(labels: list[str], s: PartitionSettings) -> list[list[int]]:
    """Not a split: each client's data comes from its own source (see the module docstring)."""
    raise DataError(
        "data.partition=per_client does not split one pooled list: each client loads its own "
        "source from data.client_sources (parablock.data.sources.client_records)"
    )


def partition(
    labels: Sequence[str] | int,
    clients: int,
    kind: str,
    seed: int,
    *,
    alpha: float = 0.5,
    weights: Sequence[float] = (),
) -> list[list[int]]:
    """Indices of the examples each client holds (``labels`` may be just a count for iid)."""
    labs = [""] * labels if isinstance(labels, int) else list(labels)
    fn = PARTITIONS.get(kind)
    return fn(labs, PartitionSettings(clients, seed, alpha, tuple(weights)))


def client_stats(examples: Sequence[Example], parts: list[list[int]]) -> list[dict]:
    """Per client: examples, tokens, response tokens and examples per label."""
    out = []
    for client, idx in enumerate(parts):
        exs = [examples[i] for i in idx]
        out.append(
            {
                "client": client,
                "examples": len(exs),
                "tokens": sum(len(e.input_ids) for e in exs),
                "response_tokens": sum(e.response_tokens for e in exs),
                "labels": dict(sorted(Counter(e.group for e in exs).items())),
            }
        )
    return out


def save(out: Path, stats: list[dict], kind: str, alpha: float) -> None:
    """``partition.json`` and ``partition.png`` (examples per client, stacked by label)."""
    meta = {"partition": kind, "alpha": alpha if kind == "dirichlet" else None, "clients": stats}
    (out / "partition.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        plot(stats, out / "partition.png", f"data.partition={kind}")
    except ImportError:
        log.info("matplotlib is not installed: no partition.png")


def plot(stats: list[dict], path: Path, title: str, max_labels: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals: Counter[str] = Counter()
    for c in stats:
        totals.update(c["labels"])
    shown = [lab for lab, _ in totals.most_common(max_labels)]
    clients = [c["client"] for c in stats]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(stats)))
    left = np.zeros(len(stats))
    colors = plt.get_cmap("tab20").colors
    rows = [(lab, [c["labels"].get(lab, 0) for c in stats]) for lab in shown]
    other = [c["examples"] - sum(c["labels"].get(lab, 0) for lab in shown) for c in stats]
    if any(other):
        rows.append((f"{len(totals) - len(shown)} other labels", other))
    for k, (lab, counts) in enumerate(rows):
        ax.barh(clients, counts, left=left, color=colors[k % len(colors)], label=lab or "(none)")
        left += np.asarray(counts)
    ax.set_yticks(clients, [f"client {c}" for c in clients])
    ax.invert_yaxis()
    ax.set_xlabel("training examples")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
