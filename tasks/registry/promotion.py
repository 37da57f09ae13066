"""Promote and roll back: the ``champion`` alias moves under the model's promotion lease, and
each decision is recorded on the versions.

:func:`promote` makes the challenger ``champion`` only if it passes :mod:`tasks.registry.gate`;
the decision and its numbers become tags on both versions. :func:`rollback` moves ``champion``
back to the previous holder.

Why a lease: MLflow has no compare-and-set on aliases or tags, so two promotions racing would both
compare against the same champion and both move the alias, and the history tag would lose an
entry. Promotions and rollbacks of one model therefore run under an exclusive lease
(:class:`tasks.lease.Lease`: a lock file created only-if-absent in a directory every promoter
shares, e.g. ``<root>/registry/locks``; refreshed while held, broken when stale). The champion
history, a JSON list of versions on the registered model (tag ``champion.history``, newest last),
is only written under the lease; the ``champion`` alias is the source of truth and the history is
reconciled with it before use.

Every registry write is fenced (:class:`_Writes`): right before each one the lease must still be
this process's (:meth:`tasks.lease.Lease.check`, as training checks before each checkpoint).
A promoter cut off from the store while it re-evaluated the champion (hours) can have its lease
broken and an operator's rollback done meanwhile; when it comes back it writes nothing more,
instead of moving the alias back and rewriting the history from what it read before. The lease
is refreshed by its own thread all along (every ``lock_stale_s / 4``), so a long evaluation keeps
it. Each write is one MLflow request, bounded by ``registry.retries`` and ``registry.timeout_s``
(:mod:`tasks.registry.session`: with the defaults 4 attempts of at most 10 s to connect and 10 s
to answer, 6 s of backoff: under 90 s), inside the margin a passed check leaves
(``lock_stale_s / 2``, 300 s by default); nothing else sits between a check and its write.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tasks.errors import LeaseBusy, RegistryError, RegistryUnavailable, StorageError
from tasks.registry.config import CHALLENGER, CHAMPION, HISTORY_TAG, RegistryConfig, _tag_value
from tasks.registry.gate import _earlier_rejection, _eval_value, _judge, _policy, improvement
from tasks.registry.refs import _aliases, _aliases_text, _registered_model, _version
from tasks.registry.session import _mlflow

if TYPE_CHECKING:
    from tasks.lease import Lease


@contextlib.contextmanager
def _lease(lock_dir: str, model_name: str, cfg: RegistryConfig,
           options: dict | None) -> Iterator[Lease]:
    """The model's promotion lease (:class:`tasks.lease.Lease`), failures as registry errors."""
    from tasks.lease import Lease

    try:
        with Lease(lock_dir, model_name, stale_s=cfg.lock_stale_s, wait_s=cfg.lock_wait_s,
                   options=options) as lease:
            yield lease
    except LeaseBusy as e:
        raise RegistryError(f"another promotion or rollback of {model_name} is running: {e}") \
            from e
    except StorageError as e:
        raise RegistryUnavailable(f"cannot take the promotion lease of {model_name}: {e}") from e


class _Writes:
    """The registry writes of one promotion or rollback, each made only while its lease holds:
    ``writes("set_registered_model_alias", name, alias, version)`` checks the lease (the fence,
    :mod:`tasks.lease`), then calls the MLflow client's method. A lost lease raises
    :class:`RegistryError` saying what was written and what to do; nothing after it is written.
    ``doing``: "promotion of v3"; ``before``: what the process did before its first write (the
    slow part, where a lease is most likely lost); ``rerun``: what to do then."""

    def __init__(self, client, lease: Lease, model_name: str, doing: str, before: str,
                 rerun: str):
        self.client, self.lease, self.model_name = client, lease, model_name
        self.doing, self.before, self.rerun = doing, before, rerun
        self.done = 0

    def __call__(self, method: str, *args) -> None:
        try:
            lost = self.lease.check()
        except StorageError as e:
            raise RegistryUnavailable(
                f"cannot check the registry lease of {self.model_name} before a write of this "
                f"{self.doing} ({self.done} made): {e}; {self.rerun} once the store answers") \
                from e
        if lost:
            where = (f"before this {self.doing} wrote anything (while it {self.before})"
                     if not self.done else f"after {self.done} writes of this {self.doing}")
            made = "nothing was written" if not self.done else "the rest were not made"
            raise RegistryError(f"the registry lease of {self.model_name} was lost {where}: "
                                f"{lost}; {made}; {self.rerun}")
        getattr(self.client, method)(*args)
        self.done += 1


def _history(rm) -> list[str]:
    """The champion history, reconciled with the ``champion`` alias (the source of truth)."""
    try:
        history = [str(v) for v in json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))]
    except (ValueError, TypeError):
        history = []
    champion = _aliases(rm).get(CHAMPION)
    if champion is not None and (not history or history[-1] != str(champion)):
        history.append(str(champion))  # the alias was moved outside promote/rollback
    return history


def _write_history(write: _Writes, name: str, history: list[str]) -> None:
    write("set_registered_model_tag", name, HISTORY_TAG, json.dumps(history[-200:]))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _challenger(client, rm, model_name: str, version: str | None, metric: str):
    """``(version, its recorded metric)`` of the version to judge (default: the challenger)."""
    if version is None:
        version = _aliases(rm).get(CHALLENGER)
        if version is None:
            raise RegistryError(f"{model_name} has no @{CHALLENGER} to promote (it has "
                                f"{_aliases_text(rm)}); register a model or pass a version")
    chall = _version(client, model_name, str(version))
    chall_value = _eval_value(chall, metric)
    if chall_value is None:
        raise RegistryError(f"{model_name} v{chall.version} has no eval.{metric} tag; "
                            "register it with an evaluation that has this metric or change "
                            "registry.metric")
    return chall, chall_value


def _record_decision(write: _Writes, model_name: str, chall, champ, ok: bool, reason: str,
                     result: dict, policy: str) -> None:
    """The decision as ``promotion.*`` tags on the challenger, and as a
    ``promotion.challenge.v<challenger>`` record on the champion it was judged against."""
    previous, metric = result["previous"], result["metric"]
    at = _now()
    # refused: not judged (no paired inputs, a broken champion), so never kept as a rejection
    decision = "promoted" if ok else "refused" if result.get("undecided") else "rejected"
    record = {"decision": decision, "at": at,
              "challenger": str(chall.version), "against": str(previous) if previous else None,
              "metric": metric, "challenger_value": result["challenger_value"],
              "champion_value": result["champion_value"], "margin": result["margin"],
              **{k: result[k] for k in ("difference", "difference_low", "difference_high",
                                        "samples", "eval_seconds", "champion_broken",
                                        "override")
                 if result.get(k) is not None},
              "reason": reason}
    for k, v in {"promotion.decision": record["decision"], "promotion.at": at,
                 "promotion.against": record["against"] or "none",
                 "promotion.metric": metric, "promotion.challenger_value": _tag_value(
                     result["challenger_value"]),
                 "promotion.champion_value": "none" if result["champion_value"] is None
                 else _tag_value(result["champion_value"]),
                 "promotion.margin": _tag_value(result["margin"]),
                 "promotion.policy": policy,
                 "promotion.paired": str(bool(result.get("paired"))).lower(),
                 **{f"promotion.{k}": _tag_value(result[k]) for k in (
                     "difference", "difference_low", "difference_high", "eval_seconds")
                    if result.get(k) is not None},
                 **({"promotion.samples": str(int(result["samples"]))}
                    if result.get("samples") is not None else {}),
                 **({"promotion.champion_broken": json.dumps(result["champion_broken"])}
                    if result.get("champion_broken") else {}),
                 **({"promotion.override": result["override"]} if result.get("override")
                    else {}),
                 "promotion.reason": reason[:4000]}.items():
        write("set_model_version_tag", model_name, chall.version, k, v)
    if champ is not None:
        write("set_model_version_tag", model_name, champ.version,
              f"promotion.challenge.v{chall.version}", json.dumps(record))


def _move_champion(write: _Writes, model_name: str, rm, chall, champ,
                   history: list[str]) -> None:
    """``champion`` → the challenger; the history, the old champion and ``challenger`` follow."""
    # alias first: it is the source of truth, and _history reconciles a missed write
    write("set_registered_model_alias", model_name, CHAMPION, chall.version)
    history.append(str(chall.version))
    _write_history(write, model_name, history)
    if champ is not None:
        write("set_model_version_tag", model_name, champ.version, "promotion.superseded_by",
              str(chall.version))
    if _aliases(rm).get(CHALLENGER) == str(chall.version):
        write("delete_registered_model_alias", model_name, CHALLENGER)


def promote(
    model_name: str,
    version: str | None = None,
    *,
    tracking_uri: str,
    cfg: RegistryConfig,
    lock_dir: str,
    evaluate: Callable[[str], dict] | None = None,
    lock_options: dict | None = None,
    explicit: bool = False,
    paired: Callable[[str], dict | None] | None = None,
    replace_broken: bool = False,
) -> dict:
    """Make ``version`` (default: the ``challenger``) the ``champion`` if the gate passes.

    A version that was rolled back is never promoted again by a scheduled run: only an
    ``explicit`` request (a person naming the version) judges it again.

    When the champion was evaluated on another set or seeds (``eval.key`` differs), ``evaluate``
    re-evaluates it on the challenger's (it gets ``models:/<name>/<champion version>`` and returns
    an evaluation dict); without it the promotion is refused rather than compare unlike numbers.
    ``lock_options``: storage options for ``lock_dir`` (default: from the environment).
    ``paired``: a version's stored paired inputs under the challenger's eval key (see
    :mod:`tasks.registry.gate`): the gate judges the paired interval of the difference, and
    without them refuses ("not judged", decision ``refused``) rather than compare point values.
    ``replace_broken``: an operator's request (``promote --replace-broken-champion``) to replace
    a champion whose metric is not a number with a challenger that passes the absolute gates;
    recorded as ``promotion.override``. It changes nothing while the champion is a number.
    """
    metric = cfg.metric
    with _mlflow(tracking_uri, cfg, f"promote {model_name}") as client, \
            _lease(lock_dir, model_name, cfg, lock_options) as lease:
        rm = _registered_model(client, model_name)
        chall, chall_value = _challenger(client, rm, model_name, version, metric)
        history = _history(rm)
        previous = _aliases(rm).get(CHAMPION)
        result = {"promoted": False, "reason": "", "champion": previous, "previous": previous,
                  "challenger": str(chall.version), "metric": metric,
                  "challenger_value": chall_value, "champion_value": None, "margin": cfg.margin,
                  "improvement": None}
        if previous is not None and str(previous) == str(chall.version):
            return result | {"reason": f"v{chall.version} is already the champion"}
        tags = chall.tags or {}
        if tags.get("promotion.decision") == "rolled_back" and not explicit:
            return result | {
                "rolled_back": True,
                "reason": f"v{chall.version} was rolled back at "
                          f"{tags.get('promotion.rolled_back_at', '?')} and is not promoted "
                          "again automatically; to promote it anyway: diffusion-pipeline "
                          f"promote --version {chall.version}"}
        policy = _policy(cfg)
        earlier = None if replace_broken else _earlier_rejection(chall, previous, policy)
        if earlier is not None:  # the same challenger, champion and policy: the same verdict
            if earlier["champion_value"] is not None:
                earlier["improvement"] = improvement(chall_value, earlier["champion_value"],
                                                     metric)
            return result | earlier
        champ = _version(client, model_name, str(previous)) if previous is not None else None
        ok, reason, compared = _judge(model_name, chall, chall_value, champ, cfg, evaluate,
                                      paired, replace_broken)
        result |= compared
        write = _Writes(client, lease, model_name, f"promotion of v{chall.version}",
                        f"judged v{chall.version} against the champion v{previous}"
                        if champ is not None else f"judged v{chall.version}", "rerun promote")
        _record_decision(write, model_name, chall, champ, ok, reason, result, policy)
        if ok:
            _move_champion(write, model_name, rm, chall, champ, history)
        return result | {"promoted": ok, "reason": reason,
                         "champion": str(chall.version) if ok else previous}


def rollback(model_name: str, *, tracking_uri: str, lock_dir: str,
             cfg: RegistryConfig | None = None, lock_options: dict | None = None) -> dict:
    """Move ``champion`` back to its previous holder (the history's second-to-last entry)."""
    cfg = cfg or RegistryConfig()
    with _mlflow(tracking_uri, cfg, f"roll back {model_name}") as client, \
            _lease(lock_dir, model_name, cfg, lock_options) as lease:
        rm = _registered_model(client, model_name)
        current = _aliases(rm).get(CHAMPION)
        if current is None:
            raise RegistryError(f"{model_name} has no @{CHAMPION} to roll back (it has "
                                f"{_aliases_text(rm)}); promote a version first")
        history = _history(rm)
        if len(history) < 2:
            raise RegistryError(f"{model_name} has no previous champion to roll back to "
                                f"(champion history: {history}); promote another version instead")
        history.pop()
        target = history[-1]
        _version(client, model_name, target)  # still there?
        at = _now()
        write = _Writes(client, lease, model_name, f"rollback of v{current}",
                        f"decided to move the champion back to v{target}",
                        "rerun rollback if the champion it finds then is still to be rolled back")
        write("set_registered_model_alias", model_name, CHAMPION, target)
        _write_history(write, model_name, history)
        write("set_model_version_tag", model_name, current, "promotion.decision", "rolled_back")
        write("set_model_version_tag", model_name, current, "promotion.rolled_back_at", at)
        write("set_model_version_tag", model_name, target, "promotion.restored_at", at)
        write("set_model_version_tag", model_name, target, "promotion.restored_from",
              str(current))
        return {"champion": target, "previous": str(current), "history": history}
