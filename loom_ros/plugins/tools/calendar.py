"""Calendar tool: events from a local ICS file or an SQLite table, by day or time range.

Query (`tool.calendar.query`): `{"date": "2026-11-24"}` or `{"start": "2026-11-24T08:00",
"end": "2026-11-24T12:00"}`; the result (`tool.calendar.result`) lists the events that overlap,
in start order. Times are local wall-clock times; `Z` (UTC) times are converted to naive UTC.
Needs `storage.read`. The ICS file is re-read when it changes.

The ICS reader is a small one written here (RFC 5545 subset: VEVENT with DTSTART, DTEND or
DURATION, SUMMARY, LOCATION, DESCRIPTION, UID; folded lines, escaped text, all-day dates). A
recurring event (RRULE) is listed at its first occurrence only and counted in health.
The SQLite source is a table (default `events`) with columns uid, summary, start, end (ISO 8601
text), location, description; it is opened read-only through the storage layer's one SQLite
opener.
"""
from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    Capability, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata, PluginResponse,
    PluginType,
)
from loom_ros.plugins.tools import ToolInputError, read_query, result_event
from loom_ros.storage.errors import StorageError
from loom_ros.storage.sqlite import open_database

QUERY = 'tool.calendar.query'
RESULT = 'tool.calendar.result'
MAX_EVENTS = 500


class IcsError(ValueError):
    """An ICS file that cannot be read; names the line and why."""


@dataclass(frozen=True)
class CalendarEvent:
    uid: str
    summary: str
    start: datetime
    end: datetime
    all_day: bool = False
    location: str = ''
    description: str = ''
    recurring: bool = False

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.all_day:
            out['start'], out['end'] = self.start.date().isoformat(), self.end.date().isoformat()
        else:
            out['start'], out['end'] = self.start.isoformat(), self.end.isoformat()
        return out


# -- ICS ----------------------------------------------------------------------------------------
_PROPERTY = re.compile(r'(?P<name>[A-Za-z0-9-]+)(?P<params>(;[^:]*)?):(?P<value>.*)\Z')
_DURATION = re.compile(r'(?P<sign>[+-])?P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?'
                       r'(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)S)?)?\Z')


def _unfold(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw[:1] in (' ', '\t') and lines:
            lines[-1] = (lines[-1][0], lines[-1][1] + raw[1:])
        elif raw.strip():
            lines.append((number, raw))
    return lines


def _unescape(value: str) -> str:
    return re.sub(r'\\([\\;,nN])', lambda m: '\n' if m.group(1) in 'nN' else m.group(1), value)


def _parse_time(value: str, params: str, line: int) -> tuple[datetime, bool]:
    value = value.strip()
    try:
        if 'VALUE=DATE' in params.upper() and 'DATE-TIME' not in params.upper() or len(value) == 8:
            return datetime.strptime(value, '%Y%m%d'), True
        if value.endswith('Z'):
            utc = datetime.strptime(value[:-1], '%Y%m%dT%H%M%S').replace(tzinfo=timezone.utc)
            return utc.replace(tzinfo=None), False
        return datetime.strptime(value, '%Y%m%dT%H%M%S'), False  # floating or TZID: wall clock
    except ValueError:
        raise IcsError(f'line {line}: bad date or time {value!r}') from None


def _parse_duration(value: str, line: int) -> timedelta:
    m = _DURATION.match(value.strip())
    if not m or value.strip() in ('P', 'PT'):
        raise IcsError(f'line {line}: bad DURATION {value!r}')
    parts = {k: int(v or 0) for k, v in m.groupdict().items() if k != 'sign'}
    delta = timedelta(weeks=parts['w'], days=parts['d'], hours=parts['h'], minutes=parts['m'],
                      seconds=parts['s'])
    return -delta if m.group('sign') == '-' else delta


def parse_ics(text: str) -> list[CalendarEvent]:
    """The VEVENTs of an ICS document; IcsError names the first bad line."""
    events, current, begin_line = [], None, 0
    lines = _unfold(text)
    if not lines or lines[0][1].strip().upper() != 'BEGIN:VCALENDAR':
        raise IcsError('line 1: not an iCalendar file (expected BEGIN:VCALENDAR)')
    for number, line in lines:
        match = _PROPERTY.match(line)
        if not match:
            raise IcsError(f'line {number}: expected NAME[;PARAMS]:VALUE, got {line[:60]!r}')
        name, params, value = match['name'].upper(), match['params'] or '', match['value']
        if name == 'BEGIN' and value.strip().upper() == 'VEVENT':
            if current is not None:
                raise IcsError(f'line {number}: VEVENT inside VEVENT (line {begin_line})')
            current, begin_line = {}, number
        elif name == 'END' and value.strip().upper() == 'VEVENT':
            if current is None:
                raise IcsError(f'line {number}: END:VEVENT without BEGIN:VEVENT')
            events.append(_event(current, begin_line))
            current = None
        elif current is not None:
            if name in ('DTSTART', 'DTEND'):
                current[name] = _parse_time(value, params, number)
            elif name == 'DURATION':
                current[name] = _parse_duration(value, number)
            elif name in ('SUMMARY', 'LOCATION', 'DESCRIPTION', 'UID'):
                current[name] = _unescape(value)
            elif name == 'RRULE':
                current[name] = value
    if current is not None:
        raise IcsError(f'line {begin_line}: VEVENT never ends (END:VEVENT missing)')
    return events


def _event(props: dict, line: int) -> CalendarEvent:
    if 'DTSTART' not in props:
        raise IcsError(f'line {line}: VEVENT without DTSTART')
    start, all_day = props['DTSTART']
    if 'DTEND' in props:
        end = props['DTEND'][0]
    elif 'DURATION' in props:
        end = start + props['DURATION']
    else:
        end = start + (timedelta(days=1) if all_day else timedelta(0))
    if end < start:
        raise IcsError(f'line {line}: VEVENT ends before it starts')
    return CalendarEvent(uid=props.get('UID', f'line-{line}'), summary=props.get('SUMMARY', ''),
                         start=start, end=end, all_day=all_day,
                         location=props.get('LOCATION', ''),
                         description=props.get('DESCRIPTION', ''), recurring='RRULE' in props)


# -- the plugin ---------------------------------------------------------------------------------
def _when(value, field: str) -> datetime:
    if not isinstance(value, str):
        raise ToolInputError(f'{field} must be an ISO 8601 date or time string, got {value!r}')
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ToolInputError(f'{field}: {value!r} is not an ISO 8601 date or time') from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


class CalendarTool(Plugin):
    metadata = PluginMetadata(
        name='calendar', version='0.1.0', type=PluginType.TOOL,
        capabilities=(Capability.STORAGE_READ,), reads=(QUERY,), writes=(RESULT,),
        description='Events of a day or time range from a local ICS file or SQLite table.')

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        ics, db = ctx.config.get('ics', ''), ctx.config.get('sqlite', '')
        if bool(ics) == bool(db):
            raise PluginError("calendar config: set exactly one of 'ics' (a .ics file) or "
                              "'sqlite' (a database file with an events table)")
        self.table = ctx.config.get('table', 'events')
        if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', str(self.table)):
            raise PluginError(f'calendar config: table {self.table!r} is not a plain table name')
        self.path = Path(os.path.expanduser(ics or db))
        ctx.require(Capability.STORAGE_READ, detail=str(self.path))
        self.kind = 'ics' if ics else 'sqlite'
        self._mtime = None
        self.events: list[CalendarEvent] = []
        self.answered = 0
        self._load()

    def _load(self) -> None:
        """(Re)read the source when its modification time changed."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise PluginError(f'calendar {self.kind} {self.path}: {exc.strerror}') from None
        if mtime == self._mtime:
            return
        if self.kind == 'ics':
            try:
                self.events = parse_ics(self.path.read_text(encoding='utf-8'))
            except (IcsError, UnicodeDecodeError) as exc:
                raise PluginError(f'calendar {self.path}: {exc}') from None
        else:
            self.events = self._read_sqlite()
        self._mtime = mtime

    def _read_sqlite(self) -> list[CalendarEvent]:
        try:
            with closing(open_database(self.path, read_only=True, check=False)) as conn:
                rows = conn.execute(
                    f'select uid, summary, start, "end", location, description from '
                    f'"{self.table}"').fetchall()
        except (sqlite3.Error, StorageError) as exc:
            raise PluginError(f'calendar {self.path}: cannot read table {self.table!r}: '
                              f'{exc}') from None
        events = []
        for uid, summary, start, end, location, description in rows:
            try:
                begin = _when(start, 'start')
                all_day = len(str(start)) == 10
                finish = _when(end, 'end') if end else begin + timedelta(days=1 if all_day else 0)
            except ToolInputError as exc:
                raise PluginError(f'calendar {self.path}: event {uid!r}: {exc}') from None
            events.append(CalendarEvent(str(uid), summary or '', begin, finish, all_day,
                                        location or '', description or ''))
        return events

    def _range(self, query: dict) -> tuple[datetime, datetime]:
        if 'date' in query:
            day = query['date']
            try:
                start = datetime.combine(date.fromisoformat(day), datetime.min.time())
            except (TypeError, ValueError):
                raise ToolInputError(f'date must be YYYY-MM-DD, got {day!r}') from None
            return start, start + timedelta(days=1)
        if 'start' in query and 'end' in query:
            start, end = _when(query['start'], 'start'), _when(query['end'], 'end')
            if end <= start:
                raise ToolInputError('end must be after start')
            return start, end
        raise ToolInputError('give "date" (YYYY-MM-DD) or "start" and "end" (ISO 8601)')

    def handle_event(self, event: Event) -> PluginResponse:
        try:
            start, end = self._range(read_query(event, QUERY))
        except ToolInputError as exc:
            return PluginResponse.failure(str(exc))
        try:
            self._load()
        except PluginError as exc:
            return PluginResponse.failure(str(exc))
        found = sorted((e for e in self.events
                        if e.start < end and (e.end > start or (e.end == e.start == start))),
                       key=lambda e: (e.start, e.uid))
        self.answered += 1
        return PluginResponse(events=[result_event(RESULT, {
            'start': start.isoformat(), 'end': end.isoformat(), 'count': len(found),
            'truncated': len(found) > MAX_EVENTS,
            'events': [e.as_dict() for e in found[:MAX_EVENTS]]}, self.metadata.name)])

    def health(self) -> HealthStatus:
        return HealthStatus(details={
            'source': f'{self.kind}:{self.path}', 'events': str(len(self.events)),
            'recurring_first_only': str(sum(e.recurring for e in self.events)),
            'answered': str(self.answered)})
