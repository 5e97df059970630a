"""Encryption at rest of the SQLite columns that hold what an event said (docs/encryption.md):
an episode's payload and a cold memory's summary (it quotes payloads) are stored as AES-GCM
ciphertext (a BLOB) under the data subject's key, or the key of the event's UTC day when
anonymous (security/keyring.py), bound to the row's identity. Erasing a subject destroys its key,
so a row that survived anywhere (a copy of the file, a backup) can no longer be read.

A TEXT value was written before encryption was turned on and is returned as it is; a BLOB is
always ciphertext and is never returned undecrypted: without a keyring it is a KeyringError."""
from __future__ import annotations

from loom_ros.security.keyring import DecryptError, Keyring, KeyringError, ShreddedError

# meta row of a unit database once a process wrote encrypted rows into it: from then on a
# process without the master key is refused at open (it would write plaintext beside them)
META_KEY = 'encryption'


def episode_context(agent_id: str, event_id: str, time_ms: int, subject: str) -> str:
    """What an episode's payload ciphertext is bound to: moved to another row, it fails."""
    return f'loom episode v1\x00{agent_id}\x00{event_id}\x00{int(time_ms)}\x00{subject}'


def cold_context(agent_id: str, type_: str, source: str, first_ms: int, last_ms: int,
                 subject: str) -> str:
    """What a cold memory's summary ciphertext is bound to."""
    return (f'loom cold v1\x00{agent_id}\x00{type_}\x00{source}\x00{int(first_ms)}\x00'
            f'{int(last_ms)}\x00{subject}')


class RowCipher:
    """seal / open of one column value; `keyring` None: encryption off (seal is the identity,
    open refuses ciphertext). `shredded` counts rows skipped because their key was destroyed."""

    def __init__(self, keyring: Keyring | None):
        self.keyring = keyring
        self.shredded = 0

    @property
    def on(self) -> bool:
        return self.keyring is not None

    def seal(self, text: str, context: str, subject: str, time_ms: int):
        """`text` as stored: ciphertext bytes under the subject's (or the day's) key, or the
        text itself when encryption is off."""
        if self.keyring is None:
            return text
        return self.keyring.encrypt(text.encode('utf-8'), context.encode('utf-8'),
                                    subject or None, int(time_ms))

    def open(self, value, context: str) -> str:
        """The text of a stored value. ShreddedError when its key was destroyed (the subject
        was erased), DecryptError when it was tampered with or moved, KeyringError when it is
        ciphertext and there is no key."""
        if isinstance(value, memoryview):
            value = bytes(value)
        if not isinstance(value, bytes):
            return value
        if self.keyring is None:
            raise KeyringError('this value is encrypted at rest (storage.encryption): open the '
                               'storage with its master key to read it')
        try:
            return self.keyring.decrypt(value, context.encode('utf-8')).decode('utf-8')
        except UnicodeDecodeError:
            raise DecryptError('a decrypted column is not UTF-8 text') from None

    def open_or_none(self, value, context: str) -> str | None:
        """`open`, but None for a row whose key was destroyed (erased data left in a copy:
        queries skip it)."""
        try:
            return self.open(value, context)
        except ShreddedError:
            self.shredded += 1
            return None


def check_marker(conn, path, encrypted: bool, mark: bool = True) -> None:
    """At open: a database that holds encrypted rows is refused to a process without the key
    (it would write plaintext beside them); one opened with the key is marked (when `mark`)."""
    row = conn.execute('select value from meta where key = ?', (META_KEY,)).fetchone()
    if encrypted:
        if mark and row is None:
            conn.execute('insert or ignore into meta (key, value) values (?, ?)', (META_KEY, 'on'))
        return
    if row is not None:
        raise KeyringError(f'{path}: holds rows encrypted at rest, but storage.encryption is off '
                           'here: refusing to write plaintext beside them (turn '
                           'storage.encryption.enabled on, with its master key)')
