"""The cloud tier's wire format: JSON requests and replies over Zenoh queries on
`loom/cloud/infer/<task>`, with a correlation id in both. Pure Python.

Request: {"id": "...", "text": "..."} | {"texts": [...]} | {"embedding": [384 floats]} |
         {"messages": [{"role": ..., "content": ...}]}
Reply (ok): {"id", "ok": true, "task", "result": {...}, "model", "cost", "server_ms"}
Reply (error, sent as a Zenoh error reply): {"id", "ok": false, "code", "error"}
"""
from __future__ import annotations

import json

KEY_PREFIX = 'loom/cloud/infer'
TASKS = ('embed', 'intent', 'chat')
RETRYABLE = frozenset({'busy', 'internal'})  # worth another attempt; the rest will fail again


class RequestInvalid(ValueError):
    """A request the server cannot answer; `code` is what the error reply carries."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def task_key(task: str, prefix: str = KEY_PREFIX) -> str:
    return f'{prefix}/{task}'


def parse_request(data: bytes) -> dict:
    try:
        body = json.loads(bytes(data) or b'null')
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestInvalid('bad_request', f'request is not JSON: {exc}') from None
    if not isinstance(body, dict):
        raise RequestInvalid('bad_request', 'request must be a JSON object')
    if not isinstance(body.get('id', ''), str):
        raise RequestInvalid('bad_request', 'id must be a string')
    return body


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()
