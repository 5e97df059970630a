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


# One or more secrets of every kind the patterns mask. A pattern added to logs.PATTERNS needs a
# sample here (test_every_pattern_has_a_sample_whose_match_holds_a_trigger says so).
SECRETS = ('Authorization: Bearer abcdefghijk', 'Baſic abcdefghijk', 'Basİc abcdefghijk',
           'basıc abcdefghijk', 'Token abcdefghijk', 'eyJhbGciOiJI.eyJzdWIiOiIx.sig',
           'sk-proj-abcdefghijklmnop', 'rk_live_abcdefghijklmnop', 'ghp_abcdefghijklmnopqrst',
           'github_pat_0123456789ab', 'glpat-abcdefghijklmnop', 'xoxb-abcdefghijklmnop',
           'AKIAABCDEFGHIJKLMNOP', 'ASIAABCDEFGHIJKLMNOP', 'AIza' + 'b' * 35,
           'mail bob@example.org', 'password=hunter2', '"api_key": "v"', 'cookie=abc',
           'passwd: x', 'apikey=x', 'API-KEY=x', 'secret=x', 'authorization=x',
           'credential=x', 'token=x')


def test_every_kind_of_secret_still_reaches_the_patterns():
    for secret in SECRETS:
        assert logs.mask_text(secret) != secret, secret
    reading = '{"seq": 12, "accel": [0.1, 0.2, 9.8], "gyro": [0.01, 0.02, 0.03]}'
    assert logs.mask_text(reading) == reading


def test_every_pattern_has_a_sample_whose_match_holds_a_trigger():
    """The trigger list is kept by hand beside the patterns: what each pattern matches (not only
    the text around it, where another secret's trigger could hide a missing one) must hold a
    trigger, and each pattern needs a sample, so a pattern added without its trigger fails here."""
    def fold(text):
        return text.casefold().replace('\u0131', 'i').replace('i\u0307', 'i')
    for pattern, _replacement in logs.PATTERNS:
        matches = [m.group(0) for text in SECRETS for m in pattern.finditer(text)]
        assert matches, f'no sample in SECRETS for {pattern.pattern}'
        for match in matches:
            assert logs._ANY_TRIGGER.search(fold(match)), (pattern.pattern, match)
    # the key=value masking: every key its key pattern takes
    keys = [m['name'] for text in SECRETS for m in logs._KEY_SEPARATOR.finditer(text)
            if logs._SECRET_KEY.search(m['name'])]
    words = {w.lower() for w in logs._SECRET_KEY.pattern.replace('[_-]?', '').split('|')}
    assert {w for w in words if any(w in k.lower().replace('-', '').replace('_', '')
                                    for k in keys)} == words, 'a secret key word has no sample'
    for key in keys:
        assert logs._ANY_TRIGGER.search(fold(key)), key
