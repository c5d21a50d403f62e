"""MERBRIDGE_REQUIRE_BPF=1 turns every skip of a bpf test into a failure,
whatever raised it; other tests may still skip. Runs pytest on generated
tests with this suite's conftest (its BPF check forced to pass, so that only
the skips written in the tests are seen)."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()

TESTS = '''
import pytest

@pytest.fixture
def skipping_fixture():
    pytest.skip("fixture says no")

@pytest.mark.bpf
def test_skip_inside_the_test():
    pytest.skip("iptables-restore is not installed")

@pytest.mark.bpf
@pytest.mark.skipif(True, reason="a marker")
def test_skipif_marker():
    pass

@pytest.mark.bpf
def test_skip_in_a_fixture(skipping_fixture):
    pass

@pytest.mark.bpf
def test_importorskip():
    pytest.importorskip("a_module_that_does_not_exist")

@pytest.mark.bpf
@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_plain_test_may_skip():
    pytest.skip("not a bpf test")

@pytest.mark.bpf
def test_passing():
    pass
'''


@pytest.fixture
def generated(pytester):
    conftest = CONFTEST.replace('pytest_plugins = ["pytester"]', "").replace("_CHECKED = False", "_CHECKED = True")
    assert conftest != CONFTEST
    pytester.makeconftest(conftest)
    pytester.makeini("[pytest]\nmarkers =\n    bpf: needs BPF\n")
    pytester.makepyfile(test_generated=TESTS)
    return pytester


def test_required_bpf_turns_every_bpf_skip_into_a_failure(generated, monkeypatch):
    monkeypatch.setenv("MERBRIDGE_REQUIRE_BPF", "1")
    result = generated.runpytest_subprocess("-rA")
    # a skip during setup (marker, fixture) is reported as an error of the test: CI fails either way
    result.assert_outcomes(failed=2, errors=2, skipped=1, xfailed=1, passed=1)
    result.stdout.fnmatch_lines(["*_ test_skip_inside_the_test _*",
                                 "BPF test skipped (Skipped: iptables-restore is not installed) and "
                                 "MERBRIDGE_REQUIRE_BPF=1 forbids skipping"])


def test_without_the_variable_bpf_tests_skip(generated, monkeypatch):
    monkeypatch.delenv("MERBRIDGE_REQUIRE_BPF", raising=False)
    result = generated.runpytest_subprocess()
    result.assert_outcomes(skipped=5, xfailed=1, passed=1)
