"""Response bodies of the dashboard's read models (issue 13): overview, site status, VM detail.

Why not in ``nkudo.cp.views``: that module is the one home of the older bodies and stays under the size rule;
these build on its base (``_View``: omit defaults, forbid unknown fields) and its ``VmView``, and
``nkudo.cp.openapi_gen`` documents them from ``VIEWS`` below like the others.
"""

from __future__ import annotations

from typing import Final

import msgspec

from nkudo.cp.domain import Connectivity, SiteHealth, VmStateSource
from nkudo.cp.views import Id, Timestamp, VmView, _View
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType, ExecState


class SiteStatus(_View):
    """A site's health with its reasons (plain text), its agents (not unenrolled) and its VMs per state."""

    site_id: Id
    tenant_id: Id
    name: str
    connectivity_state: Connectivity
    health: SiteHealth
    reasons: list[str]
    agents_online: int
    agents_offline: int
    vms_by_state: dict[VmStatus, int]


class ExpiringCertificate(_View):
    """An enrolled agent whose certificate expires within 7 days (or already has: it cannot renew by itself)."""

    agent_id: Id
    site_id: Id
    hostname: str
    cert_expires_at: Timestamp


class TenantOverview(_View):
    """One tenant at a glance; ``plans_failed_24h`` counts plans that finished FAILED in the 24 h before ``at``."""

    tenant_id: Id
    at: Timestamp
    sites: list[SiteStatus]
    hosts_online: int
    hosts_offline: int
    vms_by_state: dict[VmStatus, int]
    plans_pending: int
    plans_running: int
    plans_failed_24h: int
    expiring_certificates: list[ExpiringCertificate]


class VmStateChange(_View):
    """One change of a VM's state: seen in a heartbeat, or implied by an action's result (``execution_id``)."""

    state: VmStatus
    previous_state: VmStatus | None
    source: VmStateSource
    execution_id: Id | None
    at: Timestamp


class VmAction(_View):
    """An action that targeted the VM (an execution with its ``vm_id``)."""

    execution_id: Id
    plan_id: Id
    action_id: str
    type: ActionType
    state: ExecState
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    error_code: str | None
    error_message: str | None


class VmDetail(_View):
    """A VM as last reported, its host's name, its state history and its actions, each newest first and bounded."""

    vm: VmView
    hostname: str | None
    history: list[VmStateChange]
    actions: list[VmAction]


#: The bodies of this module, for the OpenAPI document.
VIEWS: Final[tuple[type[msgspec.Struct], ...]] = (TenantOverview, SiteStatus, VmDetail)
