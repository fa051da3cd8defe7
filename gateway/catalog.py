"""The models the configuration exposes: name to provider route, and OpenAI model objects.

Owns model resolution and the `/v1/models` listing filtered by what a principal may use.
Must not call providers: the list is the configuration's, not the provider's.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from gateway.config import Settings
from gateway.exchange import Principal, Route


def model_allowed(principal: Principal | None, model: str) -> bool:
    """Whether `principal` may use `model` (glob patterns; no principal means no limits)."""
    if principal is None:
        return True
    models = principal.models
    # `*` matches every name: the default grant is answered without a pattern match.
    return "*" in models or any(fnmatchcase(model, pattern) for pattern in models)


class Catalog:
    """Configured models by client-facing name."""

    def __init__(self, settings: Settings) -> None:
        self._routes = {
            m.name: Route(m.name, m.provider, m.upstream_model or m.name) for m in settings.models
        }
        self._owners = {m.name: m.owned_by for m in settings.models}

    def resolve(self, model: str | None) -> Route | None:
        return self._routes.get(model) if model else None

    def names(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def listing(self, principal: Principal | None) -> dict[str, Any]:
        data = [self.model_object(n) for n in self._routes if model_allowed(principal, n)]
        return {"object": "list", "data": data}

    def model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": self._owners[name]}
