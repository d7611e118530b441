"""shared.rollout: the signed rollout block a device in a cohort gets (docs/rollouts.md §3)."""

from __future__ import annotations

from typing import Any

import pytest

from hybridml.shared.errors import ManifestError
from hybridml.shared.manifest import Manifest
from hybridml.shared.rollout import RolloutBlock, load_failed_body


def manifest(version: int, name: str = "eta", **extra: Any) -> dict[str, Any]:
    """A minimal valid manifest of ``name`` v``version``."""
    return {"format": 1, "name": name, "version": version,
            "artifacts": [{"role": "model", "sha256": f"{version:064x}", "size": 10}],
            "schema": [{"name": "x", "kind": "numeric", "min": 0, "max": 1}],
            "output": {"task": "binary", "classes": ["no", "yes"]}, **extra}


def block(**over: Any) -> dict[str, Any]:
    """A canary block serving v5 with stable v4 as the companion."""
    data: dict[str, Any] = {"format": 1, "id": 7, "strategy": "canary", "role": "canary",
                            "arm": "candidate", "stable": 4, "candidate": 5, "serve": 5,
                            "step": 1, "percent": 5, "sample": 0.1, "forced": False,
                            "companion": manifest(4)}
    data.update(over)
    return data


def test_a_block_round_trips_and_its_companion_parses() -> None:
    b = RolloutBlock.from_json(block(), Manifest.from_json)
    assert (b.id, b.strategy, b.role, b.serve, b.sample, b.companion_version) == \
        (7, "canary", "canary", 5, 0.1, 4)
    assert RolloutBlock.from_json(b.to_json(), Manifest.from_json) == b
    companion = b.companion_manifest()
    assert companion is not None and (companion.name, companion.version) == ("eta", 4)
    of = RolloutBlock.of(Manifest.from_json(manifest(5, rollout=block())))
    assert of == b and of is not None and of.companion_manifest() == companion
    # without a parser the block is checked, but its companion is not parsed
    with pytest.raises(ManifestError, match=r"RolloutBlock\.of"):
        RolloutBlock.from_json(block()).companion_manifest()


def test_manifest_carries_the_block_and_content_leaves_it_out() -> None:
    plain = Manifest.from_json(manifest(5))
    served = Manifest.from_json(manifest(5, rollout=block()))
    assert RolloutBlock.of(plain) is None
    got = RolloutBlock.of(served)
    assert got is not None and got.role == "canary"
    # the same version under another role is the same model
    assert served.content() == plain.content() and served.dumps() != plain.dumps()


@pytest.mark.parametrize(("change", "field"), [
    ({"format": 2}, "rollout.format"),
    ({"surprise": 1}, "rollout.surprise"),
    ({"role": "leader"}, "rollout.role"),
    ({"strategy": "yolo"}, "rollout.strategy"),
    ({"id": "7"}, "rollout.id"),
    ({"id": True}, "rollout.id"),
    ({"serve": None}, "rollout.serve"),
    ({"sample": 1.5}, "rollout.sample"),
    ({"sample": -0.1}, "rollout.sample"),
    ({"percent": -1}, "rollout.percent"),
    ({"forced": "no"}, "rollout.forced"),
    ({"arm": 3}, "rollout.arm"),
    ({"companion": "v4"}, "rollout.companion"),
    ({"companion": {"format": 1, "name": "eta"}}, "rollout.companion"),
    ({"companion": manifest(4, signature={"key": "k"})}, "rollout.companion"),
    ({"companion": manifest(5)}, "rollout.companion"),  # the served version itself
])
def test_a_bad_block_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as err:
        RolloutBlock.from_json(block(**change), Manifest.from_json)
    assert err.value.details["field"] == field
    with pytest.raises(ManifestError) as err2:  # and a manifest carrying it is refused too
        Manifest.from_json(manifest(5, rollout=block(**change)))
    assert err2.value.details["field"] == field


def test_a_nan_sample_is_refused() -> None:  # a manifest cannot carry one: not JSON
    with pytest.raises(ManifestError, match="sample"):
        RolloutBlock.from_json(block(sample=float("nan")))


def test_serve_must_be_the_outer_version_and_the_companion_the_same_model() -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(manifest(6, rollout=block()))
    assert err.value.details["field"] == "rollout.serve"
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(manifest(5, rollout=block(companion=manifest(4, name="other"))))
    assert err.value.details["field"] == "rollout.companion"
    assert "'other'" in err.value.message


def test_an_arm_has_no_companion_and_defaults_fill_the_rest() -> None:
    b = RolloutBlock.from_json({"format": 1, "id": 3, "strategy": "ab", "role": "arm",
                                "arm": "B", "serve": 5, "companion": None})
    assert b.companion is None and b.companion_manifest() is None
    assert (b.sample, b.forced, b.stable, b.step) == (1.0, False, None, None)
    assert Manifest.from_json(manifest(5, rollout=b.to_json())).version == 5


def test_the_health_record_body_has_the_documented_shape() -> None:
    assert load_failed_body("eta", 5, 7, "model_load", "bad") == {
        "format": 1, "model": "eta", "event": "load_failed", "version": 5, "rollout": 7,
        "error": {"code": "model_load", "message": "bad"}}
