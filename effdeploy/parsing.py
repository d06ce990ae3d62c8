"""User input turned into typed values, or into a one-line EffdeployError.

Shared by every config schema (the model's in model/config.py, the pipeline's in config.py) and by
the ``EFFDEPLOY_MAX_*`` environment limits, so each fails the same way wherever it is read.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from effdeploy.errors import EffdeployError


class Strict(BaseModel):
    """A config section: unknown keys refused, values frozen, no inf or nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Pydantic's multi-line report squeezed into one line that names each bad field."""
    parts = [describe_error(e, ".".join(str(p) for p in e["loc"])) for e in err.errors()]
    return f"{source}: invalid config: " + "; ".join(parts)


def describe_error(error: Any, where: str) -> str:
    """One pydantic error as ``where: problem`` on one line (our validators name their field)."""
    msg = " ".join(str(error["msg"]).split()).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse(model_cls: type[BaseModel], data: Any, source: str) -> Any:
    """Validate ``data`` as ``model_cls``; a failure becomes a one-line EffdeployError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise EffdeployError(format_validation_error(err, source)) from None


def env_number(name: str, what: str = "a number") -> float | None:
    """A numeric limit the user set in the environment (None when unset): the one parser of the
    EFFDEPLOY_MAX_* overrides, so each refuses a bad value with the same one-line error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
        int(value)  # inf and nan are no limits
    except (ValueError, OverflowError):
        raise EffdeployError(f"{name}: not {what}: {raw!r}") from None
    return value
