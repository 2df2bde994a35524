"""pytest wiring for the end-to-end tests (the harness itself is in harness.py)."""

import pytest

from harness import GatewayFactory


@pytest.fixture
def gateways(tmp_path, request):
    f = GatewayFactory(tmp_path)
    request.node._sealgate = f
    yield f
    problems = f.close()
    if problems:
        pytest.fail("; ".join(problems))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        f = getattr(item, "_sealgate", None)
        for gw in f.gateways if f else []:
            text = gw.log()
            lines = text.splitlines()
            if len(lines) > 150:
                text = "\n".join(["[... %d lines ...]" % (len(lines) - 150)] + lines[-150:])
            rep.sections.append((f"sealgate {gw.name} stderr ({gw.log_path})", text))
            if gw.stdout_lines:
                rep.sections.append((f"sealgate {gw.name} stdout", "\n".join(gw.stdout_lines)))


