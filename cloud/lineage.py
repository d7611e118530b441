"""Version lines: display labels derived from lineage, and the retrain a fine-tune line grew from.

The integer version is the key everywhere (aliases, URLs, devices); a label is only for people:

* a ``retrain`` starts the next major line: v1, v2, v3 (in version order);
* a ``finetune`` continues its parent's line with the next minor number: fine-tunes of v1 are
  v1.1, v1.2 (a fine-tune of v1.1 is v1.2 as well: the line carries on), fine-tunes of v2 are
  v2.1, ...

Labels are computed from ``(version, parent, lineage)`` rows alone, so old registries get them
too, and the same rows always give the same labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hybridml.shared.errors import NotFoundError

if TYPE_CHECKING:
    from .registry import Registry


class VersionLike(Protocol):
    """What a label needs of a version: :class:`hybridml.cloud.registry.VersionInfo` has it."""

    @property
    def version(self) -> int: ...

    @property
    def parent(self) -> int | None: ...

    @property
    def lineage(self) -> str: ...


def display_labels(versions: Iterable[VersionLike]) -> dict[int, str]:
    """``{version: label}`` for every version of one model (any order in, version order used)."""
    ordered = sorted(versions, key=lambda v: v.version)
    line_of: dict[int, int] = {}  # version -> its major line
    minors: dict[int, int] = {}  # major line -> the last minor handed out
    labels: dict[int, str] = {}
    next_major = 1
    for v in ordered:
        major = line_of.get(v.parent) if v.lineage == "finetune" and v.parent else None
        if major is None:  # a retrain, or a fine-tune whose parent is unknown: a new line
            major, next_major = next_major, next_major + 1
            labels[v.version] = f"v{major}"
        else:
            minors[major] = minors.get(major, 0) + 1
            labels[v.version] = f"v{major}.{minors[major]}"
        line_of[v.version] = major
    return labels


def display_label(versions: Sequence[VersionLike], version: int) -> str:
    """The label of ``version`` among ``versions`` (all versions of one model): ``v1.1``."""
    labels = display_labels(versions)
    if version not in labels:
        raise NotFoundError(f"version {version} is not among the versions given "
                            f"({', '.join(map(str, sorted(labels))) or 'none'})",
                            field="version")
    return labels[version]


def base_of(versions: Sequence[VersionLike], version: int) -> int:
    """The retrain a version's line started from: itself for a retrain, else its parent's base.

    A retrain's training data is the line's data; a fine-tune saw only its new rows, so a
    later retrain starts again from the base's data.
    """
    by_version = {v.version: v for v in versions}
    seen: set[int] = set()
    current = version
    while True:
        v = by_version.get(current)
        if v is None:
            raise NotFoundError(f"version {current} is not among the versions given",
                                field="version")
        if v.lineage != "finetune" or v.parent is None or v.parent in seen \
                or v.parent not in by_version:
            return current
        seen.add(current)
        current = v.parent


def describe(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Every version of ``name`` (oldest first) as ``VersionInfo.to_json()`` plus its
    ``label``, its gate report (``gate``, None when it was not gated), its fairness report
    (``fairness``, None without ``--sensitive``) and, for a fine-tune,
    how it continued (``finetune``: ``partial_fit``, ``boosting_rounds``, ``added_trees``)."""
    versions = registry.versions(name)
    labels = display_labels(versions)
    out = []
    for v in versions:
        manifest = registry.manifest(name, v.version)
        tuned = manifest.get("training", {}).get("finetune")
        out.append({**v.to_json(), "label": labels[v.version], "gate": manifest.get("gate"),
                    "fairness": manifest.get("fairness"),
                    "finetune": tuned.get("method") if isinstance(tuned, Mapping) else None})
    return out


def gate_summary(gate: Mapping[str, Any] | None) -> str:
    """One line for a table: ``blessed vs v1: holdout 0.967/0.933, recent 0.950/0.900``
    (candidate/active), or ``-`` for a version that was not gated."""
    if not gate:
        return "-"
    parts = []
    for key in ("holdout", "recent"):
        c = gate.get(key) or {}
        if c.get("candidate") is not None and c.get("active") is not None:
            parts.append(f"{key} {c['candidate']:.3f}/{c['active']:.3f}")
    verdict = "blessed" if gate.get("blessed") else "not blessed"
    against = f" vs v{gate['against']}" if gate.get("against") else ""
    return f"{verdict}{against}" + (f": {', '.join(parts)}" if parts else "")


__all__ = ["VersionLike", "base_of", "describe", "display_label", "display_labels",
           "gate_summary"]
