"""The learned router trained on what really happened: rows from recordings (`loom record`), not
from the synthetic trace, and its evaluation against the rules on held-out recordings.

A row is one routing decision (router/decisions: event type, privacy, route, and what it was
asked with: the local confidence, latency budget and payload size; read through
router/messages.py's checks) joined by decision id with the outcome its agent reported
(router/outcomes: backend, latency, cost) and the label "was local good enough":
- `verdict`: the outcome's own (RouteOutcome has_local_verdict / local_good_enough), set by the
  agent that had a reference: the voice agent when the cloud answered too, the face agent from
  the frames that followed (agents/flows/*.py);
- `cloud`: else an agent's intent event naming the routed event (`source_event`) whose answer
  came from the cloud and that says what local would have answered (`local`): right when they
  agree. The cloud is taken as the reference.
An outcome's `success` (the route answered) is no label: agents report it for every answer.
A decision that says no payload size takes the size of the recorded event it names, when the
recording holds it. Decisions asked without a local confidence, that fail the message checks,
or that have no outcome or label are counted, not used.

Consent (issue 17): a row whose event named a data subject (the outcome's `names_subject`,
`loom.subject` on the recorded event, or the decision's own `subject`) is used only when the
consent lookup says the subject gave `learning` consent, as it is when training runs. The subject
is read from the recorded event (the recorder keeps its metadata even when it leaves the payload
out) and from the decision (two different ones: none passes); a row whose event
is not in the recording, names an invalid subject, or cannot be looked up is left out (fail
closed), and so is every subject row when no lookup is given. Each is counted.

Held out: with two or more files, the last quarter of them by recording time (at least one);
with one file, the last quarter of its rows by time. The learned router is fitted on the rest,
its operating point set there to the rules' accuracy, and both are scored on the held-out rows
with router/evaluate.py's `score` (cloud calls, cost at the policy's prices, accuracy). A
cloud answer counts as right when the row's cloud outcome succeeded; a row with no cloud outcome
counts the cloud's observed success rate in the training rows (1.0 when none was seen: said so).
Everything read is bounded: files, rows, tracked events, and each file through McapSource.
"""
from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rclpy.serialization import deserialize_message

from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, Purpose, check_subject
from loom_ros.replay.mcap_source import Limits, McapSource, RecordingError
from loom_ros.replay.ros import RosTypes
from loom_ros.router.evaluate import score
from loom_ros.router.decision import Spend, decide
from loom_ros.router.learned import LearnedRouter
from loom_ros.router.messages import DecisionMessageError, decision_of
from loom_ros.router.policy import PolicyFile

MAX_FILES = 1000
MAX_ROWS = 200_000
MAX_TRACKED_EVENTS = 100_000     # event ids remembered for their payload size / their intent
MAX_INTENT_JSON = 64 * 1024      # bytes of an intent payload parsed as JSON
MAX_ID_CHARS = 256
DECISION, OUTCOME = 'loom_msgs/msg/RouteDecision', 'loom_msgs/msg/RouteOutcome'
EVENT, BATCH = 'loom_msgs/msg/Event', 'loom_msgs/msg/EventBatch'
WANTED = (DECISION, OUTCOME, EVENT, BATCH)
# The consent registry's lookup(subject, purpose) -> ConsentState (storage/consent.py)
ConsentLookup = Callable[[str, str], object]
CONSENT_SKIPS = ('no_learning_consent', 'subject_not_recorded', 'invalid_subject',
                 'consent_unreadable', 'no_consent_registry')


class TrainingError(ValueError):
    """Nothing to train on, or the input is not usable; says why."""


class _Bounded(OrderedDict):
    """A dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class FileRows:
    path: str
    start_ns: int = 0
    rows: list[dict] = field(default_factory=list)


@dataclass
class Dataset:
    files: list[FileRows] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)   # why decisions were not rows, and more
    skipped: Counter = field(default_factory=Counter)  # McapSource's skips, all files
    errors: list[str] = field(default_factory=list)    # files that could not be read to the end

    @property
    def rows(self) -> list[dict]:
        return [r for f in self.files for r in f.rows]


def recording_files(sources: list[str], max_files: int = MAX_FILES) -> list[Path]:
    """The .mcap files named, or found under the folders named (sorted, at most max_files)."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob('*.mcap') if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise TrainingError(f'{source}: no such file or folder')
        if len(found) > max_files:
            raise TrainingError(f'more than {max_files} recordings (--max-files)')
    if not found:
        raise TrainingError(f'no .mcap recordings in {", ".join(sources)}')
    return found


def _wanted_channels(types: RosTypes):
    def check(channel):
        if channel.type_name not in WANTED:
            return 'not_used', f'{channel.topic}: {channel.type_name}'
        return types(channel)
    return check


def _text(value: str) -> str:
    return str(value)[:MAX_ID_CHARS]


def read_file(path: Path, dataset: Dataset, max_rows: int, limits: Limits = Limits(),
              types: RosTypes | None = None, consent: ConsentLookup | None = None) -> FileRows:
    """One recording's rows (see the module doc); counts go to `dataset`."""
    types = types or RosTypes()
    source = McapSource(path, _wanted_channels(types), limits)
    decisions: dict[str, dict] = {}
    outcomes: dict[str, dict] = {}
    payloads = _Bounded(MAX_TRACKED_EVENTS)   # event id -> (payload bytes, subject or '')
    verdicts = _Bounded(MAX_TRACKED_EVENTS)   # routed event id -> (local agreed, cloud answered)
    file_rows = FileRows(str(path))
    classes = {}
    try:
        for message in source.messages():
            name = message.channel.type_name
            if not file_rows.start_ns:
                file_rows.start_ns = message.log_time_ns
            try:
                cls = classes.get(name) or classes.setdefault(name, types.message_class(name))
                msg = deserialize_message(message.data, cls)
            except Exception:   # noqa: BLE001 - bad CDR: counted, the file goes on
                dataset.counts['undecodable'] += 1
                continue
            if name == DECISION:
                if len(decisions) >= max_rows:
                    dataset.counts['over_row_limit'] += 1
                    continue
                try:
                    decision_id, event_id, request, decision = decision_of(msg)
                except DecisionMessageError:
                    dataset.counts['invalid_decision'] += 1
                    continue
                decisions[decision_id] = {
                    'event_id': event_id, 'event_type': request.event_type,
                    'privacy': int(request.privacy), 'local_confidence': request.local_confidence,
                    'latency_budget_ms': request.latency_budget_ms,
                    'payload_bytes': request.payload_bytes, 'route': decision.route.value,
                    't_ns': message.log_time_ns, 'subject': request.subject}
            elif name == OUTCOME:
                if not all(math.isfinite(v) and v >= 0 for v in (msg.latency_ms, msg.cost)):
                    dataset.counts['invalid_outcome'] += 1
                elif len(outcomes) < 2 * max_rows:
                    outcomes[_text(msg.decision_id)] = {
                        'backend': _text(msg.backend), 'latency_ms': float(msg.latency_ms),
                        'cost': float(msg.cost), 'success': bool(msg.success),
                        'verdict': bool(msg.local_good_enough) if msg.has_local_verdict
                        else None, 'names_subject': bool(msg.names_subject)}
            else:
                for event in (msg.events if name == BATCH else [msg]):
                    _note_event(event, payloads, verdicts)
    except RecordingError as exc:   # what came before the damage is used
        dataset.counts['unreadable_files'] += 1
        dataset.errors.append(str(exc)[:300])
    dataset.skipped.update({k: v for k, v in source.skipped.items()})
    dataset.skipped.pop('not_used', None)
    for decision_id, d in decisions.items():
        row = _row(decision_id, d, outcomes.get(decision_id), payloads, verdicts, dataset.counts,
                   consent)
        if row is not None:
            file_rows.rows.append(row)
    file_rows.rows.sort(key=lambda r: r['t_ns'])
    return file_rows


def _note_event(event, payloads: _Bounded, verdicts: _Bounded) -> None:
    subjects = [kv.value for kv in event.metadata if kv.key == SUBJECT_METADATA_KEY]
    # Two different subjects on one event: no single id to check, so none passes.
    subject = '' if not subjects else subjects[0] if len(set(subjects)) == 1 else '..'
    payloads[_text(event.id)] = (len(event.payload), _text(subject))
    if len(event.payload) > MAX_INTENT_JSON:
        return
    try:
        data = json.loads(bytes(event.payload))
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(data, dict) and 'source_event' in data and 'local' in data \
            and 'backend' in data:
        cloud = data['backend'] == 'cloud' and not data.get('fallback')
        verdicts[_text(data['source_event'])] = (str(data['local']) == str(event.type), cloud)


def _row_subject(recorded, decided: str) -> str | None:
    """Whom a row is about: the recorded event's subject and the decision's own
    (RouteDecision.subject); two different ones are '..' (no single id to check: none passes);
    None when neither says and the event is not recorded."""
    named = {s for s in ((recorded[1] if recorded is not None else ''), decided) if s}
    if len(named) > 1:
        return '..'
    if named:
        return named.pop()
    return '' if recorded is not None else None


def _consent_skip(names_subject: bool, subject: str | None,
                  consent: ConsentLookup | None) -> str:
    """'' when the row may be trained on, else why not (CONSENT_SKIPS)."""
    if not names_subject and not subject:
        return ''   # anonymous
    if not subject:   # the outcome says it named one, and the recording does not say who
        return 'subject_not_recorded'
    if consent is None:
        return 'no_consent_registry'
    try:
        check_subject(subject)
    except ValueError:
        return 'invalid_subject'
    try:
        granted = consent(subject, Purpose.LEARNING.value).granted
    except Exception:   # noqa: BLE001 - an unreadable registry: not consented (fail closed)
        return 'consent_unreadable'
    return '' if granted else 'no_learning_consent'


def _row(decision_id: str, d: dict, outcome: dict | None, payloads, verdicts,
         counts: Counter, consent: ConsentLookup | None = None) -> dict | None:
    if d['local_confidence'] is None:
        counts['no_local_confidence'] += 1
        return None
    if outcome is None:
        counts['no_outcome'] += 1
        return None
    recorded = payloads.get(d['event_id'])
    skip = _consent_skip(outcome['names_subject'] or bool(d['subject']),
                         _row_subject(recorded, d['subject']), consent)
    if skip:
        counts[skip] += 1
        return None
    verdict = verdicts.get(d['event_id'])
    if outcome['verdict'] is not None:
        local_ok, label = outcome['verdict'], 'verdict'
    elif verdict is not None and verdict[1]:
        local_ok, label = verdict[0], 'cloud'
    else:
        counts['no_label'] += 1
        return None
    counts[f'label_{label}'] += 1
    payload = d['payload_bytes'] or (recorded[0] if recorded is not None else None)
    if payload is None:
        counts['payload_unknown'] += 1
    return {'decision_id': decision_id, 'event_type': d['event_type'],
            'privacy': d['privacy'], 'local_confidence': d['local_confidence'],
            'payload_bytes': payload or 0, 'latency_budget_ms': d['latency_budget_ms'],
            'route': d['route'], 'local_ok': bool(local_ok),
            'cloud_outcome': outcome['success'] if outcome['backend'] == 'cloud' else None,
            'latency_ms': outcome['latency_ms'], 'cost': outcome['cost'], 't_ns': d['t_ns']}


def load(sources: list[str], max_files: int = MAX_FILES, max_rows: int = MAX_ROWS,
         limits: Limits = Limits(), consent: ConsentLookup | None = None) -> Dataset:
    """Every recording's rows; `consent`: the registry's lookup (None: rows naming a data
    subject are left out)."""
    dataset = Dataset()
    types = RosTypes()
    for path in recording_files(sources, max_files):
        left = max_rows - len(dataset.rows)
        if left <= 0:
            dataset.counts['files_over_row_limit'] += 1
            continue
        dataset.files.append(read_file(path, dataset, left, limits, types, consent))
    dataset.files.sort(key=lambda f: f.start_ns)
    return dataset


def split(dataset: Dataset) -> tuple[list[dict], list[dict], str]:
    """(training rows, held-out rows, how they were split)."""
    files = [f for f in dataset.files if f.rows]
    if len(files) >= 2:
        held = max(1, len(files) // 4)
        train = [r for f in files[:-held] for r in f.rows]
        test = [r for f in files[-held:] for r in f.rows]
        return train, test, f'{len(files) - held} recording(s) train, the last {held} held out'
    rows = sorted(dataset.rows, key=lambda r: r['t_ns'])
    cut = len(rows) - max(1, len(rows) // 4)
    return rows[:cut], rows[cut:], 'one recording: its last quarter of rows held out'


def evaluate_recorded(dataset: Dataset, policy: PolicyFile, seed: int = 0) -> dict:
    """Fit on the training rows, score rules and learned on the held-out rows."""
    rows = dataset.rows
    if len(rows) < 8:
        raise TrainingError(f'{len(rows)} usable rows: too few to train and hold out '
                            f'(why decisions were not rows: {dict(dataset.counts)})')
    train, test, how = split(dataset)
    cloud_seen = [r['cloud_outcome'] for r in train if r['cloud_outcome'] is not None]
    cloud_rate = sum(cloud_seen) / len(cloud_seen) if cloud_seen else 1.0
    for row in rows:
        row['cloud_ok'] = row['cloud_outcome'] if row['cloud_outcome'] is not None \
            else cloud_rate

    def rules(request, routing, cost):
        return decide(request, routing, cloud_cost=cost, spend=Spend())

    if len({r['local_ok'] for r in train}) < 2:
        s = score(test, rules, policy)
        raise TrainingError(
            f'every one of the {len(train)} training rows says local was '
            f'{"good" if train[0]["local_ok"] else "not good"} enough: nothing to learn (record '
            'longer, or runs where local and the reference disagree; see docs/replay.md). On '
            f'the {len(test)} held-out rows ({how}) the rules made {s["cloud_calls"]} cloud '
            f'calls costing {s["cost"]:.4f} at accuracy {s["accuracy"]:.4f}; routes '
            f'{s["routes"]}; counts {dict(dataset.counts)}')
    learned = LearnedRouter.fit(train, seed=seed)

    def ml(request, routing, cost):
        return learned.decide(request, routing, cloud_cost=cost, spend=Spend())

    # The operating point is set where the learned score decides (evaluate.py does the same):
    # Public events with time for a cloud round trip.
    free = [r for r in train if r['privacy'] == 0 and r['latency_budget_ms'] > 100] or train
    target = score(free, rules, policy)['accuracy']
    learned.calibrate(free, [bool(r['cloud_ok'] >= 0.5) for r in free], target_accuracy=target)
    result = {
        'rows': len(rows), 'train_rows': len(train), 'test_rows': len(test), 'split': how,
        'files': len(dataset.files), 'learned_p_local': round(learned.p_local, 4),
        'cloud_accuracy_assumed': None if cloud_seen else 1.0,
        'cloud_success_rate_seen': round(cloud_rate, 4) if cloud_seen else None,
        'recorded': {'cloud_calls': sum(r['route'] in ('cloud', 'hybrid') for r in test),
                     'cost': round(sum(r['cost'] for r in test), 4),
                     'mean_latency_ms': round(sum(r['latency_ms'] for r in test) / len(test), 2)},
        'rules': score(test, rules, policy), 'learned': score(test, ml, policy),
        'counts': dict(dataset.counts), 'skipped': dict(dataset.skipped),
        'errors': dataset.errors[:20]}
    r, m = result['rules'], result['learned']
    result['cost_saving'] = round(1 - m['cost'] / r['cost'], 4) if r['cost'] else 0.0
    result['cloud_call_saving'] = round(1 - m['cloud_calls'] / r['cloud_calls'], 4) \
        if r['cloud_calls'] else 0.0
    result['accuracy_delta'] = round(m['accuracy'] - r['accuracy'], 4)
    result['model'] = learned
    return result


def report(result: dict) -> str:
    """The evaluation as text (what `loom router train` prints)."""
    lines = [f"{result['rows']} rows from {result['files']} recording(s): "
             f"{result['train_rows']} train, {result['test_rows']} held out ({result['split']})"]
    if result['cloud_accuracy_assumed'] is not None:
        lines.append('no cloud outcome in the training rows: the cloud is assumed always right')
    lines.append(f"{'router':<9} {'cloud calls':>12} {'cost':>9} {'accuracy':>9}   routes")
    for name in ('rules', 'learned'):
        s = result[name]
        lines.append(f"{name:<9} {s['cloud_calls']:>12} {s['cost']:>9.3f} "
                     f"{s['accuracy']:>9.4f}   {s['routes']}")
    rec = result['recorded']
    lines.append(f"{'recorded':<9} {rec['cloud_calls']:>12} {rec['cost']:>9.3f} {'':>9}   "
                 f"(what the recorded run spent; mean latency {rec['mean_latency_ms']} ms)")
    lines.append(f"learned router: {result['cost_saving']:.1%} lower cloud cost, "
                 f"{result['cloud_call_saving']:.1%} fewer cloud calls, accuracy "
                 f"{result['accuracy_delta']:+.4f} vs the rules (operating point "
                 f"p_local={result['learned_p_local']})")
    consent = {k: result['counts'][k] for k in CONSENT_SKIPS if result['counts'].get(k)}
    lines.append(f"rows left out for consent: {sum(consent.values())}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in consent.items())})" if consent else ''))
    lines.append(f"counts: {result['counts']}; skipped in the files: {result['skipped']}")
    lines.extend(f'file error: {e}' for e in result['errors'])
    return '\n'.join(lines)

