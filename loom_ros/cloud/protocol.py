"""The cloud tier's wire format: JSON requests and replies over Zenoh queries on
`loom/cloud/infer/<task>`, with a correlation id in both. Pure Python.

Request: {"id": "...", "text": "..."} | {"texts": [...]} | {"embedding": [384 floats]} |
         {"messages": [{"role": ..., "content": ...}]}
Reply (ok): {"id", "ok": true, "task", "result": {...}, "model", "cost", "server_ms"}
Reply (error, sent as a Zenoh error reply): {"id", "ok": false, "code", "error"}

Both directions are bounded before parsing (MAX_MESSAGE_BYTES) and every parser failure, deep
nesting (RecursionError) and escaped lone surrogates included, is one error type per direction:
RequestInvalid for requests, ReplyInvalid for replies.
"""
from __future__ import annotations

import json
import math

KEY_PREFIX = 'loom/cloud/infer'
TASKS = ('embed', 'intent', 'chat')
RETRYABLE = frozenset({'busy', 'internal'})  # worth another attempt; the rest will fail again
MAX_MESSAGE_BYTES = 4 * 1024 * 1024   # 256 texts of 16 KiB fit; a larger body is refused unread
MAX_ID_CHARS = 256


class RequestInvalid(ValueError):
    """A request the server cannot answer; `code` is what the error reply carries."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def task_key(task: str, prefix: str = KEY_PREFIX) -> str:
    return f'{prefix}/{task}'


class ReplyInvalid(ValueError):
    """A reply the client cannot use (not JSON, too large, fields of the wrong type)."""


def _parse_object(data: bytes, what: str) -> dict:
    """The JSON object in `data`; ValueError naming what is wrong, and nothing else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f'{what} of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}')
    data = bytes(data)
    try:
        body = json.loads(data or b'null')
        if b'\\u' in data:   # an escaped lone surrogate fails later, when re-encoded
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:   # UnicodeError is a ValueError
        raise ValueError(f'{what} is not JSON: {type(exc).__name__}: {str(exc)[:200]}') from None
    if not isinstance(body, dict):
        raise ValueError(f'{what} must be a JSON object')
    ident = body.get('id', '')
    if not isinstance(ident, str) or len(ident) > MAX_ID_CHARS:
        raise ValueError(f'id must be a string of at most {MAX_ID_CHARS} characters')
    return body


def parse_request(data: bytes) -> dict:
    """The request object; RequestInvalid('bad_request') for anything else."""
    try:
        return _parse_object(data, 'request')
    except ValueError as exc:
        raise RequestInvalid('bad_request', str(exc)) from None


def parse_reply(data: bytes) -> dict:
    """A reply object with its fields checked (`result` a mapping, `cost` a finite number,
    `code`, `error` and `model` strings); ReplyInvalid for anything else."""
    try:
        reply = _parse_object(data, 'reply')
    except ValueError as exc:
        raise ReplyInvalid(str(exc)) from None
    cost = reply.get('cost', 0.0)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not (
            isinstance(cost, float) or abs(cost) < 2**53) or not math.isfinite(cost):
        raise ReplyInvalid(f'cost must be a finite number, got a {type(cost).__name__}')
    if not isinstance(reply.get('result', {}), dict):
        raise ReplyInvalid('result must be a JSON object')
    for name in ('code', 'error', 'model'):
        if not isinstance(reply.get(name, ''), str):
            raise ReplyInvalid(f'{name} must be a string')
    return reply


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()
