"""Explanations on the device: per-row attributions from a version's explainer artifact.

The cloud writes the artifact (role ``explainer``, an ``.npz`` of plain arrays, read with
``allow_pickle=False``; :mod:`hybridml.cloud.explainers`); this module evaluates it with numpy
alone (docs/quality.md §3). Rows are validated and encoded by the schema like every other
route (:meth:`~hybridml.shared.schema.InputSchema.encode`), then turned into the estimator's
columns (imputed and scaled numbers, one-hot categories) and explained:

* ``linear``: ``coef * (x - background mean)``, exact in the model's margin space.
* ``tree_shap``: path-dependent TreeSHAP. For one leaf with distinct path features ``j``, cover
  fractions ``z_j`` and ``o_j`` (1 when the row follows the path at every split on ``j``), the
  leaf's game is ``v(S) = value * prod_{j in S} o_j * prod_{j not in S} z_j``; its Shapley
  values are ``(o_i - z_i) * sum_k w(k) [t^k] prod_{j != i} (z_j + o_j t)`` with
  ``w(k) = k! (m-1-k)! / m!``. Leaves are grouped by path width and evaluated together.

Attributions of the columns of one raw column (its one-hot categories) are summed onto it, so
``base_value + sum(attributions)`` is the model's output in ``space``.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import IntegrityError, ModelLoadError, NoModelError
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch

if TYPE_CHECKING:
    from .loaded import LoadedVersion

FORMAT = 1
MEDIA_TYPE = "application/x-hybridml-explainer"
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 4096)
_CHUNK_CELLS = 2_000_000  # rows x leaves x width evaluated at once (bounds the memory)
_CACHE = 4  # explainers kept loaded, by sha256 (immutable, content-addressed files)


@dataclass(frozen=True)
class _Bucket:
    """The leaves whose paths have at most ``width`` distinct features."""

    width: int
    feat: np.ndarray  # int [L, m], -1 = padding (a null player)
    z: np.ndarray  # [L, m] cover fractions
    value: np.ndarray  # [L, K]
    slot: np.ndarray  # [S] flat (leaf, position) of each real position
    start: np.ndarray  # [S] where its splits start in the split arrays
    efeat: np.ndarray  # [E] split feature
    ethr: np.ndarray  # [E] split threshold
    eleft: np.ndarray  # [E] True when the path goes left (x <= threshold)
    weights: np.ndarray  # [m] Shapley weights w(k)


class Explainer:
    """A loaded device explainer: maps encoded rows to attributions per raw column."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            if int(arrays["format"][0]) != FORMAT:
                raise ModelLoadError(f"explainer format {int(arrays['format'][0])} is not "
                                     f"{FORMAT}; update hybridml-edge", field="explainer")
            self.method = str(arrays["method"])
            self.space = str(arrays["space"])
            self.output = str(arrays["output"])
            self.raw_names = [str(n) for n in arrays["raw_names"]]
            self.out_class = arrays["out_class"].astype(np.int64)
            self.impute, self.mean, self.scale = arrays["impute"], arrays["scale_mean"], \
                arrays["scale"]
            self.cats = [arrays[f"cats_{j}"] for j in range(len(self.raw_names) -
                                                            len(self.impute))]
            col_raw = arrays["col_raw"]
            self.n_cols = len(col_raw)
            self.group = np.zeros((self.n_cols, len(self.raw_names)))
            self.group[np.arange(self.n_cols), col_raw] = 1.0
            if self.method == "linear":
                self.coef, self.bg_mean = arrays["coef"], arrays["bg_mean"]
                self.base = arrays["intercept"] + self.coef @ self.bg_mean
                self.buckets: list[_Bucket] = []
            else:
                self.base = arrays["base"]
                self.buckets = [_bucket(arrays, int(m)) for m in arrays["buckets"]]
        except KeyError as exc:
            raise ModelLoadError(f"the explainer artifact lacks {exc.args[0]!r}; re-train the "
                                 "version or sync again", field="explainer") from None

    # -------------------------------------------------------------------------- columns
    def columns(self, batch: EncodedBatch) -> np.ndarray:
        """float64 ``[N, P]``: the estimator's columns for encoded rows."""
        num = batch.num.astype(np.float64)
        num = np.where(np.isnan(num), self.impute, num)
        parts = [(num - self.mean) / self.scale]
        for j, cats in enumerate(self.cats):
            col = batch.cat[:, j].astype(str)
            parts.append((col[:, None] == cats[None, :]).astype(np.float64))
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(batch), 0))

    def attributions(self, batch: EncodedBatch) -> np.ndarray:
        """float64 ``[N, F, K]``: attributions per raw column and output column."""
        x = self.columns(batch)
        if self.method == "linear":
            cols = (x - self.bg_mean)[:, :, None] * self.coef.T[None, :, :]
        else:
            cols = np.zeros((x.shape[0], self.n_cols, self.base.shape[0]))
            for b in self.buckets:
                step = max(1, _CHUNK_CELLS // max(1, b.feat.size))
                for lo in range(0, x.shape[0], step):
                    cols[lo:lo + step] += _tree_shap(b, x[lo:lo + step], self.n_cols)
        return np.einsum("npk,pf->nfk", cols, self.group)


def _bucket(arrays: dict[str, np.ndarray], m: int) -> _Bucket:
    weights = np.array([math.factorial(k) * math.factorial(m - 1 - k) / math.factorial(m)
                        for k in range(m)])
    return _Bucket(m, arrays[f"b{m}_feat"], arrays[f"b{m}_z"], arrays[f"b{m}_value"],
                   arrays[f"b{m}_slot"], arrays[f"b{m}_start"], arrays[f"b{m}_efeat"],
                   arrays[f"b{m}_ethr"], arrays[f"b{m}_eleft"], weights)


def _tree_shap(b: _Bucket, x: np.ndarray, n_cols: int) -> np.ndarray:
    """``[N, P, K]`` path-dependent TreeSHAP values of the leaves in bucket ``b``."""
    n, (n_leaves, m) = x.shape[0], b.feat.shape
    # o: does the row follow the leaf's path at every split on this feature?
    fails = ((x[:, b.efeat] <= b.ethr) != b.eleft).astype(np.int32)
    o = np.ones((n, n_leaves * m))
    o[:, b.slot] = np.add.reduceat(fails, b.start, axis=1) == 0
    o = o.reshape(n, n_leaves, m)
    z = b.z
    # a: coefficients of prod_j (z_j + o_j t), lowest degree first; factor j touches j + 2
    a = np.zeros((n, n_leaves, m + 1))
    a[..., 0] = 1.0
    for j in range(m):
        hot = a[..., : j + 1] * o[:, :, j, None]
        a[..., : j + 2] *= z[None, :, j, None]
        a[..., 1: j + 2] += hot
    # o_i = 1: divide P by (z_i + t), from the top; the weighted sum of the quotient's
    # coefficients. o_i = 0: P / z_i, so phi_i = -z_i * sum_k w(k) a_k / z_i = -sum_k w(k) a_k.
    zb = np.broadcast_to(z[None], (n, n_leaves, m))
    div = np.repeat(a[..., m, None], m, axis=2)
    s1 = div * b.weights[m - 1]
    tmp = np.empty_like(div)
    for k in range(m - 1, 0, -1):
        np.multiply(zb, div, out=div)
        np.subtract(a[..., k, None], div, out=div)
        np.multiply(div, b.weights[k - 1], out=tmp)
        s1 += tmp
    cold = (a[..., :m] @ b.weights)[..., None]  # [N, L, 1]
    phi = np.where(o > 0, (1.0 - zb) * s1, -cold)  # [N, L, m]
    feat = np.where(b.feat < 0, n_cols, b.feat)  # padding goes to a dropped column
    idx = (np.arange(n)[:, None, None] * (n_cols + 1) + feat[None]).reshape(-1)
    out = np.empty((n, n_cols, b.value.shape[1]))
    for k in range(b.value.shape[1]):
        w = (phi * b.value[None, :, k, None]).reshape(-1)
        out[:, :, k] = np.bincount(idx, w, minlength=n * (n_cols + 1)).reshape(
            n, n_cols + 1)[:, :n_cols]
    return out


# ------------------------------------------------------------------------------ loading
_loaded: OrderedDict[str, Explainer] = OrderedDict()
_lock = threading.Lock()


def load(path: str | Path, sha256: str) -> Explainer:
    """The explainer in the file ``path``, checked against its manifest ``sha256`` (kept
    loaded: artifacts are immutable). Raises :class:`IntegrityError` or
    :class:`ModelLoadError`."""
    with _lock:
        hit = _loaded.get(sha256)
        if hit is not None:
            _loaded.move_to_end(sha256)
            return hit
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read the explainer {path}: {exc.strerror or exc}; run "
                             "sync again", field="explainer") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"the explainer {path} does not match its manifest's sha256; "
                             "run sync again", field="explainer")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"the explainer {path} is not a readable .npz: {exc}",
                             field="explainer") from exc
    explainer = Explainer(arrays)
    with _lock:
        _loaded[sha256] = explainer
        while len(_loaded) > _CACHE:
            _loaded.popitem(last=False)
    return explainer


def for_manifest(manifest: Manifest, artifact_path: Any) -> Explainer:
    """The explainer of ``manifest``; ``artifact_path(sha256)`` locates the stored file.
    Raises :class:`NoModelError` when the version has none (the cloud explains it)."""
    art = manifest.artifact("explainer")
    if art is None:
        family = manifest.raw.get("model", {}).get("family", "unknown")
        raise NoModelError(f"this version has no device explainer: its family is {family}; "
                           f"ask the cloud: POST /v1/models/{manifest.name}/explain",
                           name=manifest.name, version=manifest.version)
    return load(artifact_path(art.sha256), art.sha256)


def explain(explainer: Explainer, batch: EncodedBatch, predictions: Sequence[Any],
            labels: np.ndarray | None, classes: Sequence[Any], order: Sequence[str]
            ) -> list[dict[str, Any]]:
    """One answer per row (docs/quality.md §3): ``predictions`` as predict gives them,
    ``labels`` the predicted class indices (None for regression): a multiclass row is
    explained for its predicted class. ``order`` is the schema's column order."""
    attr = explainer.attributions(batch)
    where = {name: j for j, name in enumerate(explainer.raw_names)}
    pos = [where[name] for name in order]
    names = list(order)
    k_of = _columns_of(explainer.out_class, labels, len(batch))
    out: list[dict[str, Any]] = []
    for r, k in enumerate(k_of.tolist()):
        c = int(explainer.out_class[k])
        row = attr[r, pos, k].tolist()
        out.append({"prediction": predictions[r], "base_value": float(explainer.base[k]),
                    "attributions": dict(zip(names, row)), "method": explainer.method,
                    "space": explainer.space,
                    "class": None if c < 0 or not classes else classes[c]})
    return out


def _columns_of(out_class: np.ndarray, labels: np.ndarray | None, n: int) -> np.ndarray:
    """Which output column explains each row: the only one, or the predicted class's."""
    if len(out_class) == 1 or labels is None:
        return np.zeros(n, dtype=np.int64)
    col = {int(c): k for k, c in enumerate(out_class.tolist())}
    return np.array([col[int(v)] for v in labels], dtype=np.int64)




def explain_version(v: LoadedVersion, artifact_path: Callable[[str], Any],
                    rows: Iterable[Any] | Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Explain ``rows`` (typed rows, or text columns by name) with the loaded version ``v``:
    the rows pass the schema's rules like every prediction, its model gives the predictions
    and its explainer (loaded on first use, from the store's verified artifact) the rest."""
    explainer = for_manifest(v.manifest, artifact_path)
    if isinstance(rows, Mapping):
        batch = v.schema.encode_text(rows)
    else:
        batch = v.schema.encode(rows if type(rows) is list else list(rows))
    out = v.session.run(batch)
    if out.values is not None:
        predictions: list[Any] = [float(x) for x in out.values.tolist()]
        labels = None
    else:
        assert out.labels is not None
        labels = out.labels
        predictions = [v.classes[i] for i in labels.tolist()]
    return explain(explainer, batch, predictions, labels, v.classes, v.schema.names)



def explanation_text(answers: Sequence[Mapping[str, Any]]) -> str:
    """The text ``hybridml-edge predict --explain`` prints: per row the prediction, what the
    attributions sum to, and the columns by decreasing absolute attribution."""
    lines: list[str] = []
    for r, a in enumerate(answers):
        attr = a["attributions"]
        total = a["base_value"] + sum(attr.values())
        cls = "" if a["class"] is None else f" of class {a['class']!r}"
        lines.append(f"row {r}: prediction {a['prediction']!r}; {a['method']}, {a['space']}"
                     f"{cls}: base {a['base_value']:.4f} + attributions = {total:.4f}")
        width = max(len(n) for n in attr)
        for name, value in sorted(attr.items(), key=lambda kv: -abs(kv[1])):
            lines.append(f"  {name:<{width}}  {value:+.4f}")
    return "\n".join(lines)


__all__ = ["FORMAT", "MEDIA_TYPE", "Explainer", "explain", "explain_version",
           "explanation_text", "for_manifest", "load"]
