"""Settings refuse what they would misread, naming the variable and what it accepts."""

from __future__ import annotations

from dataclasses import fields

import pytest

from dispatcher.settings import InvalidSetting, Settings


@pytest.mark.parametrize(("env", "expected"), [
    ({"DISPATCHER_HTTP_PORT": " 9000 "}, {"http_port": 9000}),
    ({"DISPATCHER_LOG_FORMAT": "JSON"}, {"log_format": "json"}),
    ({"DISPATCHER_WORKERS": "0", "DISPATCHER_SHUTDOWN_TIMEOUT_SECONDS": "0"},
     {"workers": 0, "shutdown_timeout_seconds": 0.0}),
    ({"DISPATCHER_SENDER_RATE_PER_SECOND": "0.5"}, {"sender_rate_per_second": 0.5}),
    ({}, {"sender_rate_scope": "shared"}),
    ({"DISPATCHER_SENDER_RATE_SCOPE": "Process"}, {"sender_rate_scope": "process"}),
])
def test_good_values_are_read(env: dict[str, str], expected: dict[str, object]) -> None:
    settings = Settings.from_env(env)
    assert {name: getattr(settings, name) for name in expected} == expected


@pytest.mark.parametrize(("variable", "value"), [
    ("DISPATCHER_HTTP_PORT", "abc"), ("DISPATCHER_HTTP_PORT", "0"),
    ("DISPATCHER_HTTP_PORT", "65536"), ("DISPATCHER_HTTP_PORT", ""),
    ("DISPATCHER_PREFETCH", "1.5"), ("DISPATCHER_MAX_IN_FLIGHT", "0"),
    ("DISPATCHER_WORKERS", "-1"), ("DISPATCHER_SENDER_RATE_PER_SECOND", "0"),
    ("DISPATCHER_TWILIO_TIMEOUT_SECONDS", "nan"), ("DISPATCHER_LOG_FORMAT", "xml"),
    ("DISPATCHER_LOG_LEVEL", "loud"), ("DISPATCHER_DB_POOL_MAX", "0"),
    ("DISPATCHER_SENDER_RATE_SCOPE", "cluster"),
])
def test_bad_values_are_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidSetting) as refused:
        Settings.from_env({variable: value})
    message = str(refused.value)
    assert message.startswith(f"{variable}={value!r} is not accepted: use ")
    assert "\n" not in message


def test_every_default_is_itself_accepted() -> None:
    defaults = Settings()
    env = {f"DISPATCHER_{f.name.upper()}": str(getattr(defaults, f.name))
           for f in fields(Settings)}
    assert Settings.from_env(env) == defaults
