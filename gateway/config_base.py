"""The base of every configuration section.

Owns `Section`: frozen, and unknown keys are errors (a typo must not silently disable a
control). Must not hold any option itself.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")
