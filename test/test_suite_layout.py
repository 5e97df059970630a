"""The suite's own layout: what `make test` (pytest-xdist, harness.work_unit) runs together."""
from harness import REPO, SYSTEM_FILES, work_unit


def test_every_system_file_exists_and_forms_one_unit():
    # A renamed file would silently fall out of the group and run beside the others.
    missing = sorted(p for p in SYSTEM_FILES if not (REPO / p).is_file())
    assert not missing, f'SYSTEM_FILES names files that do not exist: {missing}'
    assert {work_unit(f'{p}::test_x') for p in SYSTEM_FILES} == {'system'}


def test_every_other_file_is_its_own_unit_with_all_its_tests():
    one = 'test/storage/test_crash.py'
    assert one not in SYSTEM_FILES
    assert work_unit(f'{one}::test_a') == work_unit(f'{one}::test_b[warm]') == one
    assert work_unit('test/bus/test_bus_dds.py::Test::test_c') == 'test/bus/test_bus_dds.py'
