"""Plans: validation of an ordered list of actions before anything runs.

A plan document is ``{"plan_id"?: str, "actions": [{action_id, type, params,
timeout_seconds?}, ...]}`` (a bare list of actions is accepted too). The whole
plan is validated first: one bad field anywhere rejects the plan with the
field's path (``actions[2].params.vcpus``) and nothing on the host changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final

from nkudo.errors import ValidationError
from nkudo.wire.actions import (
    ACTION_ID_PATTERN,
    DEFAULT_TIMEOUT,
    DEFAULT_TIMEOUTS,
    ActionParams,
    check_action_ids,
    parse_params,
    vm_id_of,
)
from nkudo.wire.codec import to_builtins

#: The shared pattern (``\Z``-anchored, so ``"a1\n"`` is refused; issue 10 item 2).
ACTION_ID_RE: Final = re.compile(ACTION_ID_PATTERN)
MAX_ACTIONS: Final = 1000
MAX_TIMEOUT: Final = 86400
_ACTION_KEYS: Final = {"action_id", "type", "params", "timeout_seconds", "execution_id"}


class Action:
    """One validated plan step."""

    __slots__ = ("action_id", "execution_id", "label", "params", "params_hash", "timeout", "type")

    def __init__(
        self,
        action_id: str,
        type_: str,
        params: ActionParams,
        timeout: float,
        execution_id: str | None = None,
    ) -> None:
        self.action_id = action_id
        self.type = type_
        self.params = params
        self.timeout = timeout
        self.execution_id = execution_id
        self.label: str | None = None  # the plan's own action id when action_id is an execution id
        self.params_hash = params_hash(type_, params, timeout)

    @property
    def vm_id(self) -> str | None:
        return vm_id_of(self.params)

    def params_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_builtins(self.params)
        return out


def params_hash(type_: str, params: ActionParams, timeout: float) -> str:
    """Canonical hash: same type, normalised params and timeout give the same digest."""
    doc = {"type": type_, "params": to_builtins(params), "timeout": timeout}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_action(raw: Any, where: str = "action") -> Action:
    if not isinstance(raw, dict):
        raise ValidationError(f"{where} must be an object", field=where)
    unknown = sorted(set(raw) - _ACTION_KEYS)
    if unknown:
        raise ValidationError(f"{where} has unknown field {unknown[0]!r}", field=f"{where}.{unknown[0]}")
    action_id = raw.get("action_id")
    if not isinstance(action_id, str) or not ACTION_ID_RE.match(action_id):
        raise ValidationError(
            f"{where}.action_id must be 1-128 characters of letters, digits, '_', '.', ':' or '-' (got {action_id!r})",
            field=f"{where}.action_id",
        )
    type_ = raw.get("type")
    if not isinstance(type_, str):
        raise ValidationError(f"{where}.type is required and must be a string", field=f"{where}.type")
    if "params" not in raw:
        raise ValidationError(f"{where}.params is required", field=f"{where}.params")
    params = parse_params(type_, raw["params"], prefix=f"{where}.params")
    timeout_raw = raw.get("timeout_seconds")
    if timeout_raw is None:
        timeout = float(DEFAULT_TIMEOUTS.get(type_, DEFAULT_TIMEOUT))
    else:
        if (
            isinstance(timeout_raw, bool)
            or not isinstance(timeout_raw, int | float)
            or not 0 < timeout_raw <= MAX_TIMEOUT
        ):
            raise ValidationError(
                f"{where}.timeout_seconds must be a number in (0, {MAX_TIMEOUT}] (got {timeout_raw!r})",
                field=f"{where}.timeout_seconds",
            )
        timeout = float(timeout_raw)
    execution_id = raw.get("execution_id")
    if execution_id is not None and (
        not isinstance(execution_id, str) or not ACTION_ID_RE.match(execution_id)
    ):
        raise ValidationError(f"{where}.execution_id is malformed", field=f"{where}.execution_id")
    return Action(action_id, type_, params, timeout, execution_id)


def parse_plan(doc: Any) -> tuple[str | None, list[Action]]:
    """Validate a whole plan; return (plan_id, actions) or raise ``ValidationError``."""
    plan_id = None
    if isinstance(doc, dict):
        # The control plane's plan format ({idempotency_key, actions}) is accepted as is, so one file
        # can be applied locally or submitted with `nkudo-control-plane plan apply`.
        extra = sorted(set(doc) - {"plan_id", "actions", "idempotency_key"})
        if extra:
            raise ValidationError(f"plan has unknown field {extra[0]!r}", field=extra[0])
        plan_id = doc.get("plan_id", doc.get("idempotency_key"))
        if plan_id is not None and (not isinstance(plan_id, str) or not ACTION_ID_RE.match(plan_id)):
            raise ValidationError("plan_id is malformed", field="plan_id")
        raw_actions = doc.get("actions")
    else:
        raw_actions = doc
    if not isinstance(raw_actions, list) or not raw_actions:
        raise ValidationError("actions must be a non-empty list", field="actions")
    if len(raw_actions) > MAX_ACTIONS:
        raise ValidationError(f"a plan has at most {MAX_ACTIONS} actions", field="actions")
    actions = [parse_action(a, f"actions[{i}]") for i, a in enumerate(raw_actions)]
    check_action_ids([a.action_id for a in actions])  # the control plane's plan submit calls the same rule
    return plan_id, actions
