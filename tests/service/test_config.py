"""Settings from LGG_* environment variables."""

import pytest

from app.core.config import Settings


def test_empty_api_key_variable_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LGG_API_KEY", "")
    assert Settings().api_key is None


def test_api_key_and_numbers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LGG_API_KEY", "s3cret")
    monkeypatch.setenv("LGG_MAX_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert settings.max_batch_size == 8
