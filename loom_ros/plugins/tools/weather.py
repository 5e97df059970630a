"""Weather tool: forecasts from a table in config (city -> days), deterministic and offline.

The demo's voice flow asks it "what's the weather": a `tool.weather.query` event with
`{"city": "Lisbon"}` or `{"text": "what's the weather in Lisbon"}` (the first configured city
named in the text, else `default_city`), optionally `"days": n`. The `tool.weather.result` event
carries the forecast days and a sentence for text to speech. Needs no capability.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata, PluginResponse, PluginType,
)
from loom_ros.plugins.tools import ToolInputError, read_query, result_event

QUERY = 'tool.weather.query'
RESULT = 'tool.weather.result'


class Day(BaseModel):
    model_config = ConfigDict(extra='forbid')
    summary: str
    high_c: float
    low_c: float
    rain_pct: int = Field(default=0, ge=0, le=100)


class WeatherConfig(BaseModel):
    model_config = ConfigDict(extra='forbid')
    forecasts: dict[str, list[Day]] = Field(min_length=1)
    default_city: str = ''


class WeatherTool(Plugin):
    metadata = PluginMetadata(
        name='weather', version='0.1.0', type=PluginType.TOOL, capabilities=(),
        reads=(QUERY,), writes=(RESULT,),
        description='Forecasts for configured cities from a local table (no network).')

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        try:
            self.config = WeatherConfig.model_validate(ctx.config)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise PluginError(f'weather config: {".".join(map(str, first["loc"]))}: '
                              f'{first["msg"]}') from None
        self.cities = {city.casefold(): city for city in self.config.forecasts}
        if self.config.default_city and self.config.default_city.casefold() not in self.cities:
            raise PluginError(f'weather config: default_city {self.config.default_city!r} has no '
                              f'forecast (have: {", ".join(self.config.forecasts)})')
        self.answered = 0

    def _city(self, query: dict) -> str:
        city = query.get('city')
        if city is not None:
            if not isinstance(city, str) or city.casefold() not in self.cities:
                raise ToolInputError(f'no forecast for city {city!r} (have: '
                                     f'{", ".join(self.config.forecasts)})')
            return self.cities[city.casefold()]
        text = query.get('text', '')
        if not isinstance(text, str):
            raise ToolInputError('text must be a string')
        words = text.casefold()
        for key, name in self.cities.items():
            if re.search(rf'\b{re.escape(key)}\b', words):
                return name
        if self.config.default_city:
            return self.cities[self.config.default_city.casefold()]
        raise ToolInputError('name a city ("city") or mention one in "text"; no default_city '
                             'is configured')

    def handle_event(self, event: Event) -> PluginResponse:
        try:
            query = read_query(event, QUERY)
            city = self._city(query)
            days = query.get('days', 1)
            if isinstance(days, bool) or not isinstance(days, int) or days < 1:
                raise ToolInputError(f'days must be a positive integer, got {days!r}')
        except ToolInputError as exc:
            return PluginResponse.failure(str(exc))
        forecast = self.config.forecasts[city][:days]
        today = forecast[0]
        text = (f'{city}: {today.summary}, high {today.high_c:g} degrees, low {today.low_c:g}, '
                f'{today.rain_pct}% chance of rain.')
        self.answered += 1
        return PluginResponse(events=[result_event(
            RESULT, {'city': city, 'forecast': [d.model_dump() for d in forecast], 'text': text},
            self.metadata.name)])

    def health(self) -> HealthStatus:
        return HealthStatus(details={'cities': str(len(self.cities)),
                                     'answered': str(getattr(self, 'answered', 0))})
