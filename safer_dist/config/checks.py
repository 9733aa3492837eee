"""Config errors and the checks the sections' validation raises them with."""


class ConfigError(ValueError):
    """A user mistake in a config file or an override."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key} must be one of {', '.join(allowed)} (got {value!r})")
