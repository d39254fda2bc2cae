"""The rule of tests/optional_deps.py: a missing optional module skips by name on a developer's
machine, and fails under CI unless .ci/run tests it elsewhere, or where NMPERM_OPTIONAL names it."""

import pytest
from optional_deps import TESTED_ELSEWHERE, require


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NMPERM_OPTIONAL", raising=False)
    return monkeypatch


def test_present_module_is_returned(clean_env):
    assert require("json").dumps([]) == "[]"


def test_missing_module_skips_naming_it(clean_env):
    with pytest.raises(pytest.skip.Exception, match="nmperm_no_such_module"):
        require("nmperm_no_such_module")


def test_missing_module_fails_under_ci(clean_env):
    clean_env.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nmperm_no_such_module"):
        require("nmperm_no_such_module")


def test_modules_tested_elsewhere_skip_under_ci(clean_env):
    clean_env.setenv("CI", "true")
    name = sorted(TESTED_ELSEWHERE)[0]
    clean_env.setitem(__import__("sys").modules, name, None)  # import of it raises ImportError
    with pytest.raises(pytest.skip.Exception, match=name):
        require(name)


def test_nmperm_optional_makes_a_missing_module_fail(clean_env):
    name = sorted(TESTED_ELSEWHERE)[0]
    clean_env.setenv("NMPERM_OPTIONAL", f"{name},other")
    clean_env.setitem(__import__("sys").modules, name, None)
    with pytest.raises(pytest.fail.Exception, match="NMPERM_OPTIONAL"):
        require(name)


def test_other_import_errors_are_not_hidden(clean_env, tmp_path):
    (tmp_path / "nmperm_broken_module.py").write_text("raise RuntimeError('broken, not missing')\n")
    clean_env.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="broken"):
        require("nmperm_broken_module")
