"""The one error tree of hybridml.

Every error the kit raises on purpose derives from :class:`HybridMLError`. Each class has a
stable ``code`` (safe to match on in scripts and across the HTTP API) and the HTTP ``status`` it
maps to when it crosses the API. ``to_json`` / ``from_json`` let the edge re-raise exactly what
the cloud said.

    HybridMLError                      code              status
    ├── ConfigError                    config            400
    ├── DataError                      data              400
    │   ├── SchemaError                schema            400
    │   └── InputError                 bad_input         400   (carries ``field`` and ``row``)
    ├── TrainingError                  training          500
    │   ├── ExportError                export            500
    │   │   └── ParityError            parity            500
    │   ├── QuantizationError          quantization      500
    │   └── FairnessError              fairness_gate     422   (a parity gap over --max-parity-gap)
    ├── RegistryError                  registry          500
    │   ├── NotFoundError              not_found         404
    │   ├── ConflictError              conflict          409
    │   └── StorageUnavailableError    storage_unavailable 503 (database or bucket down: retry)
    ├── ArtifactError                  artifact          502
    │   └── IntegrityError             integrity         502
    ├── ManifestError                  manifest          502
    │   └── SignatureError             signature         502   (unsigned, unknown key, bad sig)
    ├── TableError                     table             500
    ├── ModelLoadError                 model_load        500
    ├── ResourceError                  memory_budget     507   (a version over the memory budget)
    ├── InferenceError                 inference_failed  500   (the local model failed to run)
    ├── NoModelError                   no_model          404
    ├── RemoteError                    remote            502
    │   ├── CloudUnavailableError      cloud_unavailable 503
    │   └── CloudTimeoutError          cloud_timeout     504
    ├── AuthError                      unauthorized      401   (missing, unknown, revoked token)
    │   └── ForbiddenError             forbidden         403   (a device token on an admin call)
    └── HTTPError                      http              400   (API-level: 405, 413, 415 ...)
"""

from __future__ import annotations

from typing import Any, ClassVar


class HybridMLError(Exception):
    """Base of every error the kit raises on purpose.

    ``message`` says what is wrong and how to fix it; ``details`` is a small JSON-safe mapping
    (the field, the row, the offending value) for machines.
    """

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = {k: v for k, v in details.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        """Return the JSON body the API sends for this error."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}

    @classmethod
    def from_json(cls, payload: Any, status: int | None = None) -> HybridMLError:
        """Rebuild the error the cloud described; unknown codes become :class:`RemoteError`."""
        body = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(body, dict):
            return RemoteError(f"the cloud answered HTTP {status} without an error body")
        code = str(body.get("code", "error"))
        message = str(body.get("message", "no message"))
        raw = body.get("details")
        details: dict[str, Any] = raw if isinstance(raw, dict) else {}
        klass = _BY_CODE.get(code)
        if klass is None:  # a code this side does not know: keep the status class it came with
            klass = HTTPError if status is not None and 400 <= status < 500 else RemoteError
        err = klass.__new__(klass)
        HybridMLError.__init__(err, message, **details)
        if klass is InputError:
            err.field = details.get("field")  # type: ignore[attr-defined,unused-ignore]
            err.row = details.get("row")  # type: ignore[attr-defined,unused-ignore]
        if klass is HTTPError:  # status and code are per instance (413, 415, ...)
            err.status = status if status is not None else HTTPError.status  # type: ignore[misc]
            err.code = code  # type: ignore[misc]
        return err

    def __str__(self) -> str:
        return self.message


class ConfigError(HybridMLError):
    """A setting, flag or environment variable has a bad value."""

    code = "config"
    status = 400


class DataError(HybridMLError):
    """Training data (a CSV or a dataset) cannot be used as given."""

    code = "data"
    status = 400


class SchemaError(DataError):
    """An input schema is malformed or does not match the data."""

    code = "schema"
    status = 400


class InputError(DataError):
    """A row sent for prediction is malformed; names the column (``field``) and ``row``."""

    code = "bad_input"
    status = 400

    def __init__(
        self, message: str, *, field: str | None = None, row: int | None = None, **details: Any
    ) -> None:
        super().__init__(message, field=field, row=row, **details)
        self.field = field
        self.row = row


class TrainingError(HybridMLError):
    """Fitting a model failed."""

    code = "training"


class ExportError(TrainingError):
    """Converting a fitted model to ONNX failed."""

    code = "export"


class ParityError(ExportError):
    """The ONNX model does not reproduce the scikit-learn model closely enough."""

    code = "parity"


class QuantizationError(TrainingError):
    """Building or evaluating a quantized candidate failed."""

    code = "quantization"


class FairnessError(TrainingError):
    """A trained version's demographic parity difference exceeds ``--max-parity-gap``; the
    message gives the numbers per column and group. Nothing is registered."""

    code = "fairness_gate"
    status = 422


class RegistryError(HybridMLError):
    """The model registry cannot complete an operation."""

    code = "registry"


class NotFoundError(RegistryError):
    """A model, version, alias or artifact does not exist."""

    code = "not_found"
    status = 404


class ConflictError(RegistryError):
    """The operation conflicts with what is stored (e.g. an immutable artifact differs)."""

    code = "conflict"
    status = 409


class StorageUnavailableError(RegistryError):
    """The database or the artifact store cannot be reached right now (a restart, a network
    cut): nothing was written; retry the same request."""

    code = "storage_unavailable"
    status = 503


class ArtifactError(HybridMLError):
    """An artifact could not be fetched or stored."""

    code = "artifact"
    status = 502


class IntegrityError(ArtifactError):
    """An artifact's size or sha256 does not match what the manifest promised."""

    code = "integrity"
    status = 502


class ManifestError(HybridMLError):
    """A manifest is not valid JSON, has the wrong format version or misses fields."""

    code = "manifest"
    status = 502


class SignatureError(ManifestError):
    """A manifest is unsigned, signed by a key this device does not trust, or badly signed."""

    code = "signature"
    status = 502


class FreshnessError(SignatureError):
    """A validly signed manifest that is not current: an older sequence (a replay or a
    downgrade), another model or alias than asked for, or expired."""

    code = "not_fresh"
    status = 502


class TableError(HybridMLError):
    """A precomputed table is malformed or bound to another model."""

    code = "table"


class ModelLoadError(HybridMLError):
    """An ONNX model could not be loaded or fails its golden rows."""

    code = "model_load"


class ResourceError(HybridMLError):
    """A version needs more memory than this device's budget (``HYBRIDML_MEMORY_BUDGET_MB``):
    the message gives the estimate, the budget and the fix; nothing was activated."""

    code = "memory_budget"
    status = 507


class InferenceError(HybridMLError):
    """A loaded model failed to run on rows the schema accepted (onnxruntime raised).

    On the edge the rows then go to the cloud; this error reaches the caller only when the
    cloud does not answer either.
    """

    code = "inference_failed"


class NoModelError(HybridMLError):
    """The edge has no active model for this name (run ``sync`` first)."""

    code = "no_model"
    status = 404


class RemoteError(HybridMLError):
    """The cloud answered with an error the edge could not map to a local class."""

    code = "remote"
    status = 502


class CloudUnavailableError(RemoteError):
    """The cloud cannot be reached (connection refused, DNS, circuit open)."""

    code = "cloud_unavailable"
    status = 503


class BodyTooLargeError(RemoteError):
    """An answer from the cloud grew past its bound while it was read (or decompressed)."""

    code = "body_too_large"
    status = 502


class CloudTimeoutError(RemoteError):
    """The cloud did not answer within the timeout."""

    code = "cloud_timeout"
    status = 504


class AuthError(HybridMLError):
    """The request carries no bearer token, or one the cloud does not know (or revoked)."""

    code = "unauthorized"
    status = 401


class ForbiddenError(AuthError):
    """The token is valid but its role may not do this (e.g. a device token promoting)."""

    code = "forbidden"
    status = 403


class HTTPError(HybridMLError):
    """A request to the API is malformed at the HTTP level; ``status`` is set per instance."""

    code = "http"
    status = 400

    def __init__(self, message: str, *, status: int = 400, code: str | None = None,
                 **details: Any) -> None:
        super().__init__(message, **details)
        self.status = status  # type: ignore[misc]
        if code is not None:
            self.code = code  # type: ignore[misc]


def _all_subclasses(root: type[HybridMLError]) -> list[type[HybridMLError]]:
    out: list[type[HybridMLError]] = []
    for sub in root.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_ALL: list[type[HybridMLError]] = [HybridMLError, *_all_subclasses(HybridMLError)]
_BY_CODE: dict[str, type[HybridMLError]] = {k.code: k for k in _ALL}
