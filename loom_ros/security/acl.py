"""Zenoh access control for a fleet: who may publish, subscribe, ask and answer on which keys,
as the `access_control` section of the router's config (pure: a dict from a fleet description).

Subjects are certificate common names, so the rules hold only on mutual-TLS links (the router
listens on nothing else when secure). Everything not allowed is denied. Per role:

    robot     put, subscribe and answer queries under loom/<its name>/**, query loom/cloud/**
    cloud     declare queryables on and reply under loom/cloud/** (only it may answer there)
    operator  put and subscribe under loom/**, query loom/cloud/**
    router    everything under loom/** (another router of the same fleet)

plus what the fleet file grants a member (`put`, `subscribe`, `query`, `serve`: key expressions).
Zenoh matches a rule only when the message's key expression is included in the rule's, so a
robot subscribing `loom/**` is refused, not narrowed. Declarations travelling *to* a member
(others' subscribers and queryables) are allowed under loom/** so publishers see who listens
(the bridge waits for matching subscribers) and clients find the cloud's queryables.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from loom_ros.security.keys import ROLES

ROOT = 'loom'
ACTIONS = ('put', 'subscribe', 'query', 'serve')
MAX_GRANTS = 64            # key expressions per member and action
MAX_KEY_EXPR = 256
_KEY_EXPR = re.compile(r'[A-Za-z0-9_\-*$/.]+\Z')   # what a grant may say (no selectors, no '@')
# Zenoh message kinds each action lets in from the member (ingress) and out to it (egress).
_MESSAGES = {
    'put': (('put', 'delete'), ()),
    'subscribe': (('declare_subscriber',), ('put', 'delete')),
    'query': (('query',), ('reply',)),
    'serve': (('declare_queryable', 'reply'), ('query',)),
}


class AclError(ValueError):
    """A fleet description that cannot become access-control rules."""


@dataclass(frozen=True)
class Member:
    """One identity of the fleet and the key expressions it holds per action."""
    name: str
    role: str
    put: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    serve: tuple[str, ...] = ()


def role_defaults(name: str, role: str) -> dict[str, tuple[str, ...]]:
    """What a role holds without any grant."""
    own, cloud, every = f'{ROOT}/{name}/**', f'{ROOT}/cloud/**', f'{ROOT}/**'
    if role == 'robot':
        return {'put': (own,), 'subscribe': (own,), 'serve': (own,), 'query': (cloud,)}
    if role == 'cloud':
        return {'serve': (cloud,)}
    if role == 'operator':
        return {'put': (every,), 'subscribe': (every,), 'query': (cloud,)}
    if role == 'router':
        return {action: (every,) for action in ACTIONS}
    raise AclError(f'role {role!r}: one of {", ".join(ROLES)}')


def _grants(name: str, grants) -> dict[str, tuple[str, ...]]:
    if grants is None:
        return {}
    if not isinstance(grants, Mapping):
        raise AclError(f'grants of {name!r}: expected a mapping of {", ".join(ACTIONS)}')
    out = {}
    for action, exprs in grants.items():
        if action not in ACTIONS:
            raise AclError(f'grants of {name!r}: unknown action {str(action)[:40]!r} '
                           f'(one of {", ".join(ACTIONS)})')
        if isinstance(exprs, str):
            exprs = [exprs]
        if not isinstance(exprs, (list, tuple)) or len(exprs) > MAX_GRANTS:
            raise AclError(f'grants of {name!r}.{action}: a list of at most {MAX_GRANTS} '
                           'key expressions')
        for expr in exprs:
            if not isinstance(expr, str) or len(expr) > MAX_KEY_EXPR \
                    or not _KEY_EXPR.match(expr) or not expr.startswith(f'{ROOT}/'):
                raise AclError(f'grants of {name!r}.{action}: {str(expr)[:80]!r} is not a key '
                               f'expression under {ROOT}/')
        out[action] = tuple(exprs)
    return out


def fleet(identities: Iterable[tuple[str, str]],
          grants: Mapping[str, Mapping] | None = None) -> list[Member]:
    """Members from (name, role) pairs (the certificates issued) and the fleet file's grants
    ({name: {action: [key expr, ...]}}), added to the role's defaults. A grant for a name
    without an identity is an error: it would silently protect nothing."""
    grants = dict(grants or {})
    members, seen = [], set()
    for name, role in identities:
        if name in seen:
            continue
        seen.add(name)
        held = {k: list(v) for k, v in role_defaults(name, role).items()}
        for action, exprs in _grants(name, grants.pop(name, None)).items():
            held.setdefault(action, []).extend(e for e in exprs if e not in held.get(action, []))
        members.append(Member(name, role, **{k: tuple(v) for k, v in held.items()}))
    if grants:
        raise AclError(f'grants for unknown identities: {", ".join(sorted(map(str, grants)))[:200]}')
    return members


def access_control(members: Iterable[Member]) -> dict:
    """Zenoh's `access_control` config: default deny, one subject per certificate name."""
    rules, subjects, policies = [], [], []
    for member in members:
        ids = []
        for action in ACTIONS:
            exprs = list(getattr(member, action))
            if not exprs:
                continue
            ingress, egress = _MESSAGES[action]
            for flow, messages in (('ingress', ingress), ('egress', egress)):
                if messages:
                    rule_id = f'{member.name}/{action}/{flow}'
                    rules.append({'id': rule_id, 'permission': 'allow', 'flows': [flow],
                                  'messages': list(messages), 'key_exprs': exprs})
                    ids.append(rule_id)
        rule_id = f'{member.name}/declarations/egress'
        rules.append({'id': rule_id, 'permission': 'allow', 'flows': ['egress'],
                      'messages': ['declare_subscriber', 'declare_queryable'],
                      'key_exprs': [f'{ROOT}/**']})
        ids.append(rule_id)
        subjects.append({'id': member.name, 'cert_common_names': [member.name]})
        policies.append({'id': member.name, 'rules': ids, 'subjects': [member.name]})
    return {'enabled': True, 'default_permission': 'deny', 'rules': rules,
            'subjects': subjects, 'policies': policies}
