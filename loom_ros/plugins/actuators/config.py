"""Config of the actuator plugins: defaults from config/actuators.yaml, overridden by the
`config:` the plugin host passes, validated with pydantic so a bad key names itself."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom_ros.bus.qos import UnknownQosLevel, parse_level
from loom_ros.config.params import config_dir
from loom_ros.plugins.contract import PluginError
from loom_ros.config.params import read_yaml, refuse_unknown_keys

DEFAULTS_FILE = 'actuators.yaml'
SECTIONS = ('robot_control', 'ui')   # one per actuator plugin; any other key is a typo

NonNeg = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)

    @field_validator('*', mode='after')
    @classmethod
    def _qos_level(cls, value, info):
        if info.field_name.endswith('qos'):
            try:
                return parse_level(value).value
            except UnknownQosLevel as exc:
                raise ValueError(str(exc)) from None
        return value


class RobotControlConfig(_Section):
    cmd_vel_topic: str = Field(min_length=1)
    stamped: bool
    frame_id: str
    cmd_vel_qos: str
    estop_topic: str = Field(min_length=1)
    estop_qos: str
    max_linear: tuple[NonNeg, NonNeg, NonNeg]
    max_angular: tuple[NonNeg, NonNeg, NonNeg]
    max_linear_accel: Positive
    max_angular_accel: Positive
    watchdog_timeout_s: Positive
    max_duration_s: Positive
    control_rate_hz: Annotated[float, Field(gt=0.0, le=1000.0)]


class UiConfig(_Section):
    state_topic: str = Field(min_length=1)
    markers_topic: str = Field(min_length=1)
    qos: str
    frame_id: str = Field(min_length=1)
    marker_ns: str
    height_m: float
    line_spacing_m: float
    text_size_m: Positive
    color: tuple[Unit, Unit, Unit, Unit]
    lifetime_s: NonNeg
    max_text_chars: int = Field(ge=1)
    max_state_bytes: int = Field(ge=256, le=65536)   # recorded whole, parsed for loom.subjects


def load_section(section: str, model: type[_Section], overrides: dict | None,
                 path: str | None = None) -> _Section:
    """Defaults of `section` from actuators.yaml overlaid with `overrides`; PluginError names the
    file or key and the reason."""
    path = path or str(config_dir() / DEFAULTS_FILE)
    data = read_yaml(path, PluginError)
    defaults = data.get(section) if isinstance(data, dict) else None
    if not isinstance(defaults, dict):
        raise PluginError(f'{path}: no `{section}:` mapping of defaults')
    refuse_unknown_keys(data, SECTIONS, str(path), PluginError)
    refuse_unknown_keys(defaults, model.model_fields, f'{path}: {section}', PluginError)
    if overrides is not None and not isinstance(overrides, dict):
        raise PluginError(f'{section}: config must be a mapping, got {type(overrides).__name__}')
    try:
        return model.model_validate({**defaults, **(overrides or {})})
    except ValidationError as exc:
        problems = '; '.join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in exc.errors())
        raise PluginError(f'{section} config: {problems}') from None
