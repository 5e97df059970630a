"""Log and episode masking checks a text once for anything a secret pattern needs before it runs
the eight patterns (telemetry/logs.py `_SECRET_TRIGGERS`). The pre-check may only skip texts
that no pattern would change: on every text both paths must give the same result."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.telemetry import logs

CHECK = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

# Fragments of every pattern (prefixes, separators, key words in any case) and plain readings.
pieces = st.sampled_from([
    'Bearer ', 'basic ', 'TOKEN ', 'token=', 'eyJ', 'eyJhbGciOi', '.', 'sk-', 'pk_', 'rk-live-',
    'ghp_', 'gho-', 'github_pat_', 'glpat-', 'xoxb-', 'AKIA', 'ASIA', 'AIza', '@', 'a@b.co',
    'api_key', 'API-KEY', 'apikey', 'Secret', 'password', 'passwd', 'Authorization', 'cookie',
    'credential', ': ', '=', '"', "'", ' ', '\n', '-', '_', 'abcdefghij0123456789',
    'ABCDEFGHIJKLMNOP', 'Baſic ', 'BEARER ', 'Token ', '\u212a', 'ſ', 'İ', 'ı', 'basıc ', 'BASİC ', '{"seq": 12, "accel": [0.1, 9.8]}', 'x' * 40])
texts = st.one_of(st.text(max_size=200),
                  st.builds(''.join, st.lists(pieces, max_size=12)))


@CHECK
@given(texts)
def test_the_pre_check_never_changes_what_is_masked(text):
    assert logs._mask_patterns(text) == logs._mask_all_patterns(text)


def test_every_kind_of_secret_still_reaches_the_patterns():
    for secret in ('Authorization: Bearer abcdefghijk', 'Baſic abcdefghijk',
                   'Basİc abcdefghijk', 'basıc abcdefghijk', 'eyJhbGciOiJI.eyJzdWIiOiIx.sig',
                   'sk-proj-abcdefghijklmnop', 'ghp_abcdefghijklmnopqrst', 'github_pat_0123456789ab',
                   'AKIAABCDEFGHIJKLMNOP', 'AIza' + 'b' * 35, 'mail bob@example.org',
                   'password=hunter2', '"api_key": "v"', 'cookie=abc'):
        assert logs.mask_text(secret) != secret, secret
    reading = '{"seq": 12, "accel": [0.1, 0.2, 9.8], "gyro": [0.01, 0.02, 0.03]}'
    assert logs.mask_text(reading) == reading
