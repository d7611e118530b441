"""The manifest: the JSON document that describes one model version to the edge.

Format 1 (``"format": 1``)::

    {
      "format": 1, "name": "eta", "version": 3, "parent": 2, "lineage": "retrain",
      "created": "2026-11-27T18:00:00Z",
      "artifacts": [{"role": "model", "sha256": "...", "size": 1234,
                     "media_type": "application/onnx", "variant": "int8_dynamic"}, ...],
      "schema": [{"name": "hour", "kind": "numeric", "dtype": "float32", "min": 0, "max": 23}],
      "output": {"task": "multiclass", "classes": ["a", "b"],
                 "outputs": ["label", "probabilities"]},
      "metrics": {...}, "quantization": {...}, "profile": {...}, "training": {...},
      "golden": {"rows": [[...]], "labels": [...], "probabilities": [[...]], "values": [...],
                 "tolerance": 1e-4}
    }

A served manifest adds ``release`` (which alias it answers, its sequence, issued-at and
expiry: :mod:`hybridml.shared.release`), ``signature``, for a device in a rollout's cohort
``rollout`` (its role and the companion model: :mod:`hybridml.shared.rollout`) and, when the
cloud hands out direct artifact URLs (docs/storage.md §3), ``sources`` (``{sha256: url}`` for
the edge artifacts of the manifest and of its companion) with ``sources_expire`` (ISO time,
presigned URLs only); all are about the delivery, not the model, so :meth:`Manifest.content`
leaves them out when a device compares versions.

Artifact roles: ``model`` (what the edge runs: fp32 or int8, whichever passed the accuracy
guard), ``model_fp32`` (the cloud's serving model), ``table`` (precomputed predictions) and
``explainer`` (the device explainer, docs/quality.md §3).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError
from .release import Release
from .rollout import block_of
from .schema import InputSchema

FORMAT = 1
ROLES = ("model", "model_fp32", "table", "explainer")
# The artifacts a device downloads (model_fp32 is the cloud's); table and explainer are optional.
EDGE_ROLES = ("model", "table", "explainer")
TASKS = ("binary", "multiclass", "regression")
LINEAGES = ("retrain", "finetune")
# About how a manifest was served, not the model: the same version signed later, or under
# another rollout role, is the same model.
DELIVERY_KEYS = ("release", "signature", "rollout", "sources", "sources_expire")
MAX_SOURCE_URL = 8192  # a presigned URL with a session token is ~2 KB
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`ManifestError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ManifestError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", field="name")
    return name


@dataclass(frozen=True)
class Artifact:
    """One immutable file of a version, addressed by its sha256."""

    role: str
    sha256: str
    size: int
    media_type: str = "application/octet-stream"
    variant: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the manifest entry."""
        out: dict[str, Any] = {"role": self.role, "sha256": self.sha256, "size": self.size,
                               "media_type": self.media_type}
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, data: Any) -> Artifact:
        """Parse and validate one manifest entry."""
        if not isinstance(data, Mapping):
            raise ManifestError("each artifact must be an object", field="artifacts")
        role, sha, size = data.get("role"), data.get("sha256"), data.get("size")
        if role not in ROLES:
            raise ManifestError(f"artifact role {role!r} is not one of {ROLES}", field="role")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise ManifestError(f"artifact {role!r} has an invalid sha256 {sha!r}",
                                field="sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"artifact {role!r} has an invalid size {size!r}", field="size")
        return cls(role, sha, size, str(data.get("media_type", "application/octet-stream")),
                   data.get("variant"))


def positive_class(raw: Mapping[str, Any]) -> str | None:
    """The positive class of a binary manifest: ``metrics.positive`` (the class with fewer
    training rows, docs/quality.md §1), or ``classes[1]`` for a version from before that
    rule; None for other tasks. The one reading of it, for the cloud and the edge."""
    output = raw.get("output")
    output = output if isinstance(output, Mapping) else {}
    classes = output.get("classes") or []
    if output.get("task") != "binary" or len(classes) != 2:
        return None
    metrics = raw.get("metrics")
    recorded = metrics.get("positive") if isinstance(metrics, Mapping) else None
    return str(classes[1]) if recorded is None else str(recorded)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``raw`` keeps every field, known or not."""

    name: str
    version: int
    task: str
    classes: tuple[Any, ...] | None
    artifacts: tuple[Artifact, ...]
    schema: InputSchema
    raw: Mapping[str, Any]

    def artifact(self, role: str) -> Artifact | None:
        """Return the artifact with ``role``, or None."""
        return next((a for a in self.artifacts if a.role == role), None)

    @property
    def positive(self) -> str | None:
        """A binary model's positive class (:func:`positive_class`); None for other tasks."""
        return positive_class(self.raw)

    @property
    def golden(self) -> Mapping[str, Any]:
        """Golden rows and expected outputs (may be empty)."""
        g = self.raw.get("golden")
        return g if isinstance(g, Mapping) else {}

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as a JSON-ready dict."""
        return dict(self.raw)

    def dumps(self) -> bytes:
        """Canonical bytes: sorted keys, no spaces (what is hashed and signed)."""
        return canonical_json(self.raw)

    @property
    def sources(self) -> Mapping[str, str]:
        """Direct download URLs by sha256 (docs/storage.md §3); empty without any."""
        raw = self.raw.get("sources")
        return raw if isinstance(raw, Mapping) else {}

    def content(self) -> bytes:
        """Canonical bytes of the model description alone, without the delivery keys
        (``release``, ``signature``, ``rollout``, ``sources``): equal for two servings of the
        same version, whenever they were signed, under whichever rollout role and whatever
        URLs they named for the artifacts."""
        return canonical_json({k: v for k, v in self.raw.items() if k not in DELIVERY_KEYS})

    @property
    def release(self) -> Release | None:
        """The signed release block, or None (a manifest from an older cloud, or the registry's
        own copy)."""
        return Release.of(self.raw)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Validate a decoded manifest; raises :class:`ManifestError` naming the field."""
        if not isinstance(data, Mapping):
            raise ManifestError("a manifest must be a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ManifestError(
                f"manifest format {fmt!r} is not supported (this kit reads format {FORMAT}); "
                "upgrade hybridml on this device", field="format")
        name = check_name(data.get("name"))  # type: ignore[arg-type]
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ManifestError(f"manifest version must be a positive integer, got {version!r}",
                                field="version")
        output = data.get("output")
        if not isinstance(output, Mapping) or output.get("task") not in TASKS:
            raise ManifestError(f"manifest 'output.task' must be one of {TASKS}", field="output")
        classes = output.get("classes")
        if output["task"] != "regression" and (not isinstance(classes, list) or len(classes) < 2):
            raise ManifestError("a classifier's manifest needs 'output.classes' (2 or more)",
                                field="output.classes")
        arts = data.get("artifacts")
        if not isinstance(arts, list):
            raise ManifestError("manifest 'artifacts' must be a list", field="artifacts")
        artifacts = tuple(Artifact.from_json(a) for a in arts)
        if not any(a.role == "model" for a in artifacts):
            raise ManifestError("manifest lists no artifact with role 'model'", field="artifacts")
        try:
            schema = InputSchema.from_json(data.get("schema"))
        except Exception as exc:
            raise ManifestError(f"manifest 'schema' is invalid: {exc}", field="schema") from exc
        try:
            canonical_json(data)  # what is hashed, signed and stored must serialise
        except UnicodeEncodeError:
            raise ManifestError("manifest holds text that is not valid Unicode (a lone "
                                "surrogate such as \\ud800)", field="manifest") from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest holds a value JSON cannot carry: {exc}",
                                field="manifest") from None
        release = Release.of(data)
        if release is not None and (release.name != name or release.version != version):
            raise ManifestError(f"the release block names {release.name!r} v{release.version} "
                                f"but the manifest is {name!r} v{version}", field="release")
        block_of(data, name, version, cls.from_json)  # a rollout block must fit this manifest
        check_sources(data)
        return cls(name, version, str(output["task"]),
                   tuple(classes) if isinstance(classes, list) else None,
                   artifacts, schema, dict(data))

    @classmethod
    def loads(cls, text: str | bytes) -> Manifest:
        """Parse manifest text; invalid JSON (also: nested too deeply, not UTF-8, a NaN
        literal) is a :class:`ManifestError`."""
        try:
            data = _DECODER.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest is not UTF-8 (bad byte at offset {exc.start})",
                                field="manifest") from None
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc.msg} at line {exc.lineno} "
                                f"column {exc.colno}", field="manifest") from None
        except RecursionError:
            raise ManifestError("manifest nests arrays or objects too deeply to be one",
                                field="manifest") from None
        except ValueError as exc:  # NaN/Infinity literals, numbers of thousands of digits
            raise ManifestError(f"manifest is not valid JSON: {str(exc)[:80]}",
                                field="manifest") from None
        return cls.from_json(data)


def check_sources(data: Mapping[str, Any]) -> None:
    """:class:`ManifestError` unless ``sources`` (if any) maps sha256 hex to URL text and
    ``sources_expire`` (if any) is text."""
    sources = data.get("sources")
    if sources is not None:
        if not isinstance(sources, Mapping):
            raise ManifestError("manifest 'sources' must be an object of sha256 -> URL",
                                field="sources")
        for sha, url in sources.items():
            if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
                raise ManifestError(f"manifest 'sources' has a key {str(sha)[:80]!r} that is "
                                    "not a sha256", field="sources")
            if not isinstance(url, str) or not 0 < len(url) <= MAX_SOURCE_URL:
                raise ManifestError(f"manifest 'sources' of {sha[:12]} must be a URL of 1 to "
                                    f"{MAX_SOURCE_URL} characters", field="sources")
    expire = data.get("sources_expire")
    if expire is not None and not isinstance(expire, str):
        raise ManifestError("manifest 'sources_expire' must be an ISO time", field="sources_expire")


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_not_json)


def canonical_json(data: Any) -> bytes:
    """Serialise ``data`` deterministically (sorted keys, compact, UTF-8)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
