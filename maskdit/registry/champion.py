"""The champion gate: which version of a registered model is `champion`, moved by compare-and-set.

`champion` moves to the new version only when its FID is lower than the
champion's AND both were measured under the same settings (`SETTINGS`: the sha256 of the
reference statistics file, num_samples, the sampler's cfg_scale / num_steps / sigma_min /
sigma_max / rho, the sha256 of the Inception weights). Otherwise the version stays `candidate`
and `RegisterResult.reason` says why ("champion version 3 was evaluated with num_samples=50000,
this one with 10000: not comparable"). A registration without an evaluation (`register()` with no
`evaluation`, so no recorded settings) takes `champion` only when there is none yet; against an
existing champion it is not comparable, and so is any version against a champion registered
without settings: a person moves the alias then (`MlflowClient().set_registered_model_alias`).

Only a finite, non-negative FID takes part (`FID`, checked where results are read and again here);
a champion whose recorded FID is not one (registered before that check) is replaced by the next
version that has one, so a NaN champion cannot block every later model.

Compare-and-set. MLflow has no conditional alias update, so read-compare-move is made atomic
with a per-model lock: a registered model named `<name>.champion-lock`. Creating a registered
model is an insert under a unique name in MLflow's store, so exactly one of several concurrent
creators succeeds; the winner's token is a tag written in the same insert, with the tag
`maskdit.lock_of` = `<name>`. A registered model of that name is maskdit's lock only when it carries
that tag and has no versions: a user's model that happens to have the name is never deleted (not
even when it looks stale) and the registration stops with one line naming it. The holder reads the
champion, compares, moves the alias, re-reads it (verify-after-write) and deletes the lock; the
others poll until it is gone. A lock older than `LOCK_STALE_S` (its holder died between create
and delete; the critical section is a few REST calls) is broken by the next registration. Should
a holder stall past that and lose its lock, the verify step sees the alias moved by someone else
or the lock's token changed and decides again under a new lock, so the better version still ends
as champion. tests/test_registry.py races two processes on a real MLflow server.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from maskdit.core.errors import UserError

CANDIDATE, CHAMPION = "candidate", "champion"
FID_TAG = "fid"
# version tags that must be equal for two FIDs to be compared (the sampler's come from SamplerConfig)
# what makes two FIDs comparable: the sampler's precision changes the samples, its `compile` does not
SETTINGS = ("ref_stats_sha256", "num_samples", "cfg_scale", "num_steps", "sigma_min", "sigma_max", "rho", "precision",
            "inception_sha256")
LOCK_SUFFIX = ".champion-lock"  # registered model `<name>.champion-lock`: the champion alias's lock
LOCK_TOKEN_TAG = "maskdit.lock_token"
LOCK_OF_TAG = "maskdit.lock_of"  # the model whose champion alias it locks: what marks a registered model as a lock
LOCK_STALE_S = 120.0  # a lock this old lost its holder (the critical section is a few REST calls)
LOCK_WAIT_S = 300.0  # give up waiting for the lock after this (> LOCK_STALE_S: a dead holder's lock is broken first)


class RegistryError(UserError, RuntimeError):
    """Registration was impossible (no tracking URI, unreadable checkpoint or manifest, the champion lock held
    too long)."""


def _champion(client, name: str) -> tuple[str | None, float | None, dict[str, str]]:
    """(version, fid, tags) of the current champion of `name`, or (None, None, {})."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, {}
    fid = version.tags.get(FID_TAG)
    # str: a sqlite store gives the version as an int, a tracking server as a string
    return str(version.version), (float(fid) if fid is not None else None), dict(version.tags)


def _shown(key: str, value: str) -> str:
    return f"{key}={value[:12]}..." if key.endswith("sha256") and len(value) > 12 else f"{key}={value}"


def not_comparable(new: dict[str, str], champion: dict[str, str], champion_version: str) -> str | None:
    """Why an FID measured under the `new` tags cannot be compared with the champion's; None when it can."""
    missing = [k for k in SETTINGS if not new.get(k)]
    if missing:
        return (f"this version has no recorded evaluation settings ({', '.join(missing)}), so its FID cannot be "
                f"compared with champion version {champion_version}'s: register an evaluation (maskdit evaluate, "
                "then maskdit register evaluation=...)")
    missing = [k for k in SETTINGS if not champion.get(k)]
    if missing:
        return (f"champion version {champion_version} has no recorded evaluation settings ({', '.join(missing)}): "
                "not comparable; move the champion alias by hand if this version should win")
    differ = [k for k in SETTINGS if new[k] != champion[k]]
    if differ:
        return (f"champion version {champion_version} was evaluated with "
                f"{', '.join(_shown(k, champion[k]) for k in differ)}, this one with "
                f"{', '.join(_shown(k, new[k]) for k in differ)}: not comparable")
    return None


@contextmanager
def champion_lock(client, name: str) -> Iterator[Callable[[], bool]]:
    """Hold `<name>.champion-lock` (see the module doc); yields a check "do I still hold it"."""
    from mlflow.exceptions import MlflowException

    lock, token = name + LOCK_SUFFIX, uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:  # an insert under a unique name: one concurrent creator wins
            client.create_registered_model(lock, tags={LOCK_TOKEN_TAG: token, LOCK_OF_TAG: name},
                                           description=f"lock of the {CHAMPION} alias of {name} (maskdit register)")
            break
        except MlflowException as error:
            # lost the insert; the server then reads the winner's lock for its message, and answers
            # RESOURCE_DOES_NOT_EXIST when the winner deleted it in between: lost all the same
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held_by = _lock_token(client, lock, stale_only=True)
        if held_by is not None:  # its holder died: break it (the verify step covers a holder that only stalled)
            _delete_lock(client, lock)
        elif time.monotonic() > deadline:
            raise RegistryError(f"registered model {lock!r} (the lock of {name}'s {CHAMPION} alias) was held for "
                                f"{LOCK_WAIT_S:.0f} s; retry, or delete it if no registration of {name} runs")
        time.sleep(random.uniform(0.05, 0.25))

    def held() -> bool:
        return _lock_token(client, lock) == token

    try:
        yield held
    finally:
        if held():
            _delete_lock(client, lock)


def _lock_token(client, lock: str, stale_only: bool = False) -> str | None:
    """The lock's token (None when there is no lock, or with `stale_only` when it is younger than LOCK_STALE_S)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException:
        return None
    if model.tags.get(LOCK_OF_TAG) != lock[: -len(LOCK_SUFFIX)] or client.search_model_versions(
            f"name = '{lock}'", max_results=1):  # not our lock: someone's model of that name
        raise RegistryError(f"a registered model named {lock!r} exists and is not maskdit's lock (no "
                            f"{LOCK_OF_TAG} tag, or it has versions); maskdit uses that name to lock the {CHAMPION} "
                            f"alias of {lock[: -len(LOCK_SUFFIX)]!r}: rename that model, or register under another "
                            "name")
    if stale_only and time.time() - model.creation_timestamp / 1000 < LOCK_STALE_S:
        return None
    return model.tags.get(LOCK_TOKEN_TAG, "")


def _delete_lock(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def promote(client, name: str, version: str, fid: float,
            tags: dict[str, str]) -> tuple[bool, str | None, float | None, str | None]:
    """Compare-and-set of `champion`: (champion?, previous champion, its FID, reason it stayed candidate)."""
    before = None  # the champion we first saw (the result reports it)
    for _ in range(3):
        with champion_lock(client, name) as held:
            previous, previous_fid, previous_tags = _champion(client, name)
            before = before or (previous, previous_fid)
            if previous == version:  # a retry after a lost lock: we set it, and nobody better moved it since
                return True, *before, None
            reason = None if previous is None else not_comparable(tags, previous_tags, previous)
            if previous_fid is not None and not (math.isfinite(previous_fid) and previous_fid >= 0):
                reason = None  # a champion without a valid FID (registered before the check) yields to a valid one
            elif reason is None and previous_fid is not None and not float(fid) < previous_fid:
                reason = f"champion version {previous} has FID {previous_fid:.6g}, this one {float(fid):.6g}"
            if reason is not None:
                return False, previous, previous_fid, reason
            client.set_registered_model_alias(name, CHAMPION, version)
            # verify-after-write: still our alias, and our lock (a stalled holder can lose it as stale)
            if held() and str(client.get_model_version_by_alias(name, CHAMPION).version) == version:
                return True, *before, None
    raise RegistryError(f"lost the lock of {name}'s {CHAMPION} alias three times; retry the registration")
