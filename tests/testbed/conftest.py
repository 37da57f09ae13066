"""The ``testbed`` fixture: the multi-host testbed of infra/testbed, up once per session.

Tests that use it are marked ``integration`` and ``testbed`` here at collection (run them alone
with ``pytest -m testbed``; the fast tier leaves them out). The testbed needs root and
``ip netns``; without them the tests are skipped with the reason. It is torn down at the end of
the session, also after failures; a failing test's report carries the tail of every service
log. A testbed that was already up when the session started (``python -m infra.testbed up``
by hand) is used as it is and left up.
"""

from __future__ import annotations

import pytest

from infra.testbed import Testbed, TestbedError, unavailable_reason


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "testbed" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.testbed)


@pytest.fixture(scope="session")
def testbed():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tb = Testbed()
    owned = not tb.is_up()
    try:
        tb.up()
    except TestbedError as e:
        pytest.fail(f"the testbed did not come up: {e}", pytrace=False)
    try:
        yield tb
    finally:
        if owned:
            tb.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    tb = getattr(item, "funcargs", {}).get("testbed")
    if report.failed and isinstance(tb, Testbed):
        report.sections.append(("testbed service logs (tails)", tb.log_tails(40)))
