import pytest

from tttlab.core.cli import user_errors
from tttlab.core.errors import ConfigError


def test_user_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exc, user_errors("tttlab-x"):
        raise ConfigError("lr=-1: expected >= 0")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tttlab-x: error: ConfigError: lr=-1: expected >= 0\n"


def test_other_exceptions_keep_their_traceback(capsys):
    with pytest.raises(ZeroDivisionError), user_errors("tttlab-x"):
        1 / 0  # noqa: B018
    assert capsys.readouterr().err == ""
