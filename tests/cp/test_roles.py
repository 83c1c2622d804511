"""Issue 13 (roles): who may change what, over the real use cases on SQLite and PostgreSQL.

The principals are the ones real dashboard sessions resolve to (``SessionContext.principal_for``): an owner,
an operator and a viewer member, and a read-only API-key session; besides, a plain tenant API key keeps the
JSON API's full access. The expectations are written out per role, not derived from ``role_allows``, so a
wrong rule fails here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from nkudo.cp.domain import Permission, PrincipalKind, Role, keeps_an_owner, role_allows
from nkudo.cp.errors import Forbidden, Unauthenticated
from nkudo.cp.models import ApiKeyCreate, PlanAction, PlanCreate, QuotaUpdate, SiteCreate, TokenCreate
from nkudo.cp.records import Principal, RequestInfo

from .test_accounts import ADMIN, PASSWORD, Env, ca, env  # noqa: F401 - the fixtures are used by name

INFO = RequestInfo(request_id="roles")
_n = itertools.count()


def test_role_permission_table() -> None:
    """Issue 13: owners may do everything, operators read/operate/enroll, viewers only read."""
    table = {role: {perm for perm in Permission if role_allows(role, perm)} for role in Role}
    assert table == {
        Role.OWNER: {Permission.READ, Permission.OPERATE, Permission.ENROLL, Permission.MANAGE},
        Role.OPERATOR: {Permission.READ, Permission.OPERATE, Permission.ENROLL},
        Role.VIEWER: {Permission.READ},
    }


def test_principal_allows() -> None:
    """Issue 13: the admin and a role-less tenant API key (today's API) may do all; a role limits; a user
    principal without a role may do nothing."""
    assert all(Principal(PrincipalKind.ADMIN).allows(p) for p in Permission)
    assert all(Principal(PrincipalKind.API_KEY, tenant_id="t", key_id="k").allows(p) for p in Permission)
    ro = Principal(PrincipalKind.API_KEY, tenant_id="t", key_id="k", role=Role.VIEWER)
    assert ro.allows(Permission.READ) and not ro.allows(Permission.OPERATE)
    assert not any(Principal(PrincipalKind.USER, tenant_id="t", user_id="u").allows(p) for p in Permission)
    op = Principal(PrincipalKind.USER, tenant_id="t", user_id="u", role=Role.OPERATOR)
    assert op.allows(Permission.ENROLL) and not op.allows(Permission.MANAGE)
    assert op.actor.type.value == "USER" and op.actor.id == "u"


def test_last_owner_rule() -> None:
    """Issue 13: a change may not take a tenant's only owner away; tenants without owners stay admin-managed."""
    assert not keeps_an_owner(1, Role.OWNER, Role.VIEWER) and not keeps_an_owner(1, Role.OWNER, None)
    assert keeps_an_owner(2, Role.OWNER, None) and keeps_an_owner(1, Role.VIEWER, None)
    assert keeps_an_owner(0, None, Role.VIEWER) and keeps_an_owner(1, Role.OWNER, Role.OWNER)


Op = Callable[[Env, Principal, str], Coroutine[Any, Any, Any]]


async def _plan(e: Env, p: Principal, site_id: str) -> Any:
    vm = f"vm-{next(_n)}"
    return await e.cp.plans.create_plan(p, site_id, PlanCreate(idempotency_key=f"k-{vm}", actions=[PlanAction(
        type="MicroVMCreate", params={"vm_id": vm, "name": vm, "vcpus": 1, "memory_mib": 256,
                                      "kernel_path": "/var/lib/nkudo/vmlinux", "nics": [{"bridge": "br0"}]})]),
        INFO)


async def _cancel(e: Env, p: Principal, site_id: str) -> Any:
    plan = await _plan(e, ADMIN, site_id)
    return await e.cp.plans.cancel_plan(p, plan.plan_id, INFO)


async def _token(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.enrollment.issue_token(p, e.tenant_id, TokenCreate(site_id=site_id), INFO)


async def _site(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.tenancy.create_site(p, e.tenant_id, SiteCreate(name=f"site-{next(_n)}"), INFO)


async def _key(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.access.create_api_key(p, e.tenant_id, ApiKeyCreate(name=f"key-{next(_n)}"), INFO)


async def _revoke_key(e: Env, p: Principal, site_id: str) -> Any:
    key = await _key(e, ADMIN, site_id)
    return await e.cp.access.revoke_api_key(p, e.tenant_id, key.id, INFO)


async def _grant(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.accounts.grant(p, e.tenant_id, "spare@example.com", Role.VIEWER, INFO)


async def _invite(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.accounts.invite(p, e.tenant_id, f"new{next(_n)}@example.com", Role.VIEWER, None, INFO)


async def _sessions(e: Env, p: Principal, site_id: str) -> Any:
    return await e.cp.accounts.list_sessions(p, e.tenant_id, None)


WRITES: dict[str, Op] = {"create_plan": _plan, "cancel_plan": _cancel, "issue_token": _token,
                         "create_site": _site, "create_api_key": _key, "revoke_api_key": _revoke_key,
                         "grant": _grant, "invite": _invite, "list_sessions": _sessions}
EVERYTHING = set(WRITES)
ALLOWED = {
    "owner": EVERYTHING,
    "operator": {"create_plan", "cancel_plan", "issue_token"},
    "viewer": set(),
    "api_key_session": set(),
    "tenant_api_key": EVERYTHING,  # the JSON API's tenant key: full access to its tenant, as before
}


def _principals(e: Env) -> dict[str, Principal]:
    out: dict[str, Principal] = {}
    for role in Role:
        email = f"{role.value}@example.com"
        e.run(e.cp.accounts.create_user(email, PASSWORD))
        e.run(e.cp.accounts.grant(ADMIN, e.tenant_id, email, role, INFO))
        ctx = e.run(e.cp.accounts.login(email, PASSWORD, None, INFO, None)).context
        out[role.value] = ctx.principal_for(e.tenant_id)
    e.run(e.cp.accounts.create_user("spare@example.com", PASSWORD))
    e.run(e.cp.accounts.grant(ADMIN, e.tenant_id, "spare@example.com", Role.OPERATOR, INFO))  # the admin may add
    key = e.run(e.cp.access.create_api_key(ADMIN, e.tenant_id, ApiKeyCreate(name="ro"), INFO))
    out["api_key_session"] = e.run(e.cp.accounts.login_api_key(key.api_key, None, INFO, None)
                                   ).context.principal_for(e.tenant_id)
    out["tenant_api_key"] = e.run(e.cp.access.authenticate(None, key.api_key))
    return out


def test_each_role_over_the_real_use_cases(env: Env) -> None:  # noqa: F811 - the fixture
    """Issue 13: viewers and API-key sessions change nothing; operators run plans and issue enrollment tokens
    but manage no sites, keys or members; owners (and a plain tenant API key, as before) may do all of it.
    A refusal is a 403 FORBIDDEN_ROLE naming the permission, before anything is read or written."""
    site_id = env.run(env.cp.tenancy.create_site(ADMIN, env.tenant_id, SiteCreate(name="main"), INFO)).id
    principals = _principals(env)
    assert principals["tenant_api_key"].role is None
    seen: dict[str, set[str]] = {}
    for who, p in principals.items():
        seen[who] = set()
        for name, op in WRITES.items():
            try:
                env.run(op(env, p, site_id))
            except Forbidden as exc:
                assert exc.status == 403 and exc.code == "FORBIDDEN_ROLE", exc
                assert "permission" in str(exc)
            else:
                seen[who].add(name)
    assert seen == ALLOWED
    for p in principals.values():  # every one of them reads
        assert site_id in [s.id for s in env.run(env.cp.tenancy.list_sites(p, env.tenant_id)).sites]
        assert env.run(env.cp.accounts.list_members(p, env.tenant_id))
        env.run(env.cp.enrollment.list_tokens(p, env.tenant_id))
    with pytest.raises(Unauthenticated) as not_admin:  # quotas stay the admin's
        env.run(env.cp.quotas.set_quota(principals["owner"], env.tenant_id, QuotaUpdate(max_sites=3), INFO))
    assert not_admin.value.code == "ADMIN_REQUIRED"
    events = [e for e in env.audit_rows() if e.action == "plan.create" and e.actor_type == "USER"]
    assert {e.actor_id for e in events} == {principals["owner"].user_id, principals["operator"].user_id}
