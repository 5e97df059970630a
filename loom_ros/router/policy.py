"""Routing policies: the numbers the router's rules compare against, loaded from config/policy.yaml.

A policy file has a `default` policy, overrides per event type and per agent (agent wins over
event type, both over default), the cloud models' cost per call, and a spending budget per period.
Validation happens at load: a bad file is refused with the key that is wrong and why.
Pure Python (pydantic, PyYAML), no rclpy.
"""
from __future__ import annotations

import math
from pathlib import Path

from loom_ros.config.params import read_yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PolicyError(ValueError):
    """A policy file or value that cannot be used; names the key and the reason."""


class RoutingPolicy(BaseModel):
    """Every number the seed's decision algorithm uses, as a setting."""

    model_config = ConfigDict(extra='forbid', frozen=True)

    threshold: float = Field(0.8, ge=0.0, le=1.0,
                             description='local confidence at or above this: Local')
    hybrid_floor: float = Field(0.5, ge=0.0, le=1.0,
                                description='confidence strictly between this and threshold: Hybrid')
    latency_local_ms: float = Field(100.0, ge=0.0,
                                    description='a latency budget strictly under this: Local')
    cost_cap: float = Field(0.01, ge=0.0,
                            description='a cloud call costing strictly more than this: LocalFallback')
    cloud_model: str = Field('cloud-default', min_length=1,
                             description='the model (key of models:) a cloud route would call')
    sensitive_upload: str = Field('embedding', pattern='^(embedding|none)$',
                                  description='what a Sensitive event may send up')

    @model_validator(mode='after')
    def _floor_below_threshold(self):
        if self.hybrid_floor > self.threshold:
            raise ValueError(f'hybrid_floor ({self.hybrid_floor}) must not exceed threshold '
                             f'({self.threshold})')
        return self


# The shortest budget period: spend counts from the last multiple of the period, so a period of
# 1e-320 s counted nothing and the budget was off. The shipped policy uses a day.
MIN_BUDGET_PERIOD_S = 1.0


class Budget(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)

    period_s: float = Field(86400.0, ge=MIN_BUDGET_PERIOD_S, allow_inf_nan=False,
                            description='length of a budget period in seconds, finite, at least '
                            f'{MIN_BUDGET_PERIOD_S:g} (periods start at its multiples)')
    limit: float = Field(5.0, ge=0.0, description='most cloud spend per period')


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)

    default: RoutingPolicy = RoutingPolicy()
    event_types: dict[str, dict] = {}
    agents: dict[str, dict] = {}
    models: dict[str, float] = {'cloud-default': 0.002}
    budget: Budget = Budget()

    @model_validator(mode='after')
    def _overrides_are_valid(self):
        # Costs first: a NaN cost compared false with every cap and never added to the spend.
        for name, cost in self.models.items():
            if not math.isfinite(cost) or cost < 0:
                raise ValueError(f'models.{name}: cost per call must be >= 0 and finite, '
                                 f'got {cost}')
        self._check_model('default', self.default)
        for section in ('event_types', 'agents'):
            for name, override in getattr(self, section).items():
                try:
                    policy = RoutingPolicy(**{**self.default.model_dump(), **override})
                except ValidationError as exc:
                    raise ValueError(f'{section}.{name}: {_first_error(exc)}') from None
                self._check_model(f'{section}.{name}', policy)
        return self

    def _check_model(self, where: str, policy: RoutingPolicy) -> None:
        """A cloud_model with no cost loaded fine and then failed every decision: refused here."""
        if policy.cloud_model not in self.models:
            have = ', '.join(sorted(self.models)[:10]) + (', ...' if len(self.models) > 10 else '')
            raise ValueError(f'{where}.cloud_model: {policy.cloud_model[:80]!r} has no cost under '
                             f'models: (have: {have or "none"})')

    def policy_for(self, event_type: str = '', agent_id: str = '') -> RoutingPolicy:
        """The default, overlaid by the event type's overrides, then the agent's."""
        merged = self.default.model_dump()
        merged.update(self.event_types.get(event_type, {}))
        merged.update(self.agents.get(agent_id, {}))
        return RoutingPolicy(**merged)

    def cost_of(self, model: str) -> float:
        if model not in self.models:
            raise PolicyError(f'models: no cost configured for cloud model {model!r}')
        return self.models[model]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = '.'.join(str(p) for p in err['loc']) or '(top level)'
    return f'{where}: {err["msg"]}'


def parse_policy(data: object, source: str = 'policy') -> PolicyFile:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f'{source}: expected a mapping at the top level')
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f'{source}: {_first_error(exc)}') from None


def load_policy(path: str | Path) -> PolicyFile:
    """Load and validate a policy file; PolicyError names the file, the key and the reason."""
    return parse_policy(read_yaml(path, PolicyError), str(path))
