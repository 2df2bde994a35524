"""pytest wiring for the end-to-end tests (the harness itself is in harness.py)."""

import pytest

from harness import GatewayFactory
from pki import Spec, make_pki


@pytest.fixture
def gateways(tmp_path, request):
    f = GatewayFactory(tmp_path)
    request.node._sealgate = f
    yield f
    problems = f.close()
    if problems:
        pytest.fail("; ".join(problems))


def _pki_spec(module) -> Spec:
    spec = getattr(module, "PKI", None)
    if not isinstance(spec, Spec):
        pytest.fail(f"{module.__name__} takes the pki fixture but defines no `PKI = pki.Spec(...)`")
    return spec


@pytest.fixture(scope="module")
def _module_pki(request, tmp_path_factory):
    """The module's PKI made once (for `PKI = Spec(..., scope="module")`)."""
    spec = _pki_spec(request.module)
    return make_pki(tmp_path_factory.mktemp(f"{request.module.__name__}-pki"), spec)


@pytest.fixture
def pki(request, tmp_path):
    """The test module's PKI (its `PKI = pki.Spec(...)`), as `pki.make_pki` returns it: fresh
    in `tmp_path/pki` for each test, or made once per module when the spec says so."""
    spec = _pki_spec(request.module)
    if spec.scope == "module":
        return request.getfixturevalue("_module_pki")
    d = tmp_path / "pki"
    d.mkdir()
    return make_pki(d, spec)


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


