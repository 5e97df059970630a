"""The cloud tests use the bridge tests' fixtures (Zenoh router process, client sessions)."""
import importlib.util
import sys
from pathlib import Path

# its plain helpers (link_fixtures), which it imports by name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bridge'))
_spec = importlib.util.spec_from_file_location(
    'loom_test_bridge_fixtures', Path(__file__).resolve().parents[1] / 'bridge' / 'conftest.py')
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

zenoh_router = _fixtures.zenoh_router
zsession = _fixtures.zsession
port = _fixtures.port
endpoint = _fixtures.endpoint
zenoh_keys = _fixtures.zenoh_keys
zenoh_keys_root = _fixtures.zenoh_keys_root
