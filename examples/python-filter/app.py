"""min-total: a tidegate `filter` plugin in Python.

Keeps inserts, updates and replaces whose document's `total` is at least `min-total`
(default 100), and every delete (a delete carries no document). Config (any other key is
refused):
    min-total   a number (default 100)

Build: ./build.sh min-total.wasm   (componentize-py; see README.md)
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, log, types

_KNOWN_KEYS = ("min-total",)
_min_total = None


def _load() -> float:
    global _min_total
    if _min_total is None:
        # A misspelt key must never be ignored silently: refuse every key but ours.
        unknown = [key for key, _ in config.entries() if key not in _KNOWN_KEYS]
        if unknown:
            keys = ", ".join(f"`{key}`" for key in unknown)
            known = ", ".join(f"`{key}`" for key in _KNOWN_KEYS)
            plural = "" if len(unknown) == 1 else "s"
            raise Err(types.PluginError_InvalidConfig(f"unknown config key{plural} {keys} (known keys: {known})"))
        raw = config.get("min-total")
        try:
            _min_total = float(raw) if raw is not None else 100.0
        except ValueError:
            raise Err(types.PluginError_InvalidConfig(f"`min-total` must be a number, got {raw!r}"))
    return _min_total


class WitWorld(wit_world.WitWorld):
    def init(self) -> None:
        log.write(log.Level.DEBUG, f"min-total configured: {_load()}")

    def filter(self, event: types.ChangeEvent) -> bool:
        minimum = _load()
        if isinstance(event.operation, types.Operation_Delete):
            return True
        document = event.full_document or event.full_document_before_change
        if document is None:
            return False
        try:
            total = json.loads(document).get("total")
        except ValueError as err:
            raise Err(types.PluginError_InvalidEvent(f"document is not JSON: {err}"))
        # Relaxed Extended JSON: large integers and decimals arrive wrapped.
        if isinstance(total, dict):
            total = total.get("$numberLong") or total.get("$numberDecimal") or total.get("$numberDouble")
            try:
                total = float(total)
            except (TypeError, ValueError):
                total = None
        return isinstance(total, (int, float)) and not isinstance(total, bool) and total >= minimum
