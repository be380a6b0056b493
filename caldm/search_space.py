"""Search spaces of the sweeps (``tuning/spaces.yaml``): parsed and checked against the config.

A space maps config keys to one of :data:`DOMAINS`; every value it can produce must be a valid
config value on top of the sweep's preset and overrides, so a typo fails before any trial. The
Tune driver (:mod:`caldm.distributed.tune`) turns each :class:`Domain` into a Tune domain.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from caldm.config import load_config, parse_override, read_yaml, valid_keys
from caldm.errors import ConfigError

log = logging.getLogger("caldm.sweep")

DOMAINS = ("loguniform", "uniform", "randint", "choice")


@dataclass(frozen=True)
class Domain:
    """One searched config key: ``kind`` in :data:`DOMAINS` over ``values``."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def probes(self) -> list[Any]:
        """Values that must all be valid config values: every choice, or both bounds."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)


def decode(value: Any) -> Any:
    """A trial's value of a key as a config value (choices arrive as JSON strings)."""
    return json.loads(value) if isinstance(value, str) else value


def overrides_of(config: dict[str, Any]) -> list[str]:
    """A trial's searched values as ``--set`` overrides (JSON is valid YAML)."""
    return [f"{key}={json.dumps(decode(value))}" for key, value in sorted(config.items())]


def _domain(source: str, key: str, spec: Any) -> Domain:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(
            f"{source}: {key}: expected one of {{{', '.join(f'{d}: [...]' for d in DOMAINS)}}}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {key}: {kind} needs a non-empty list")
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            raise ConfigError(f"{source}: {key}: {kind} needs [low, high] numbers")
        low, high = values
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{source}: {key}: {kind} [{low}, {high}] is not a valid range")
    return Domain(key, kind, tuple(values))


def load_space(
    url: str,
    target: str,
    preset: str | None,
    base: list[str] | None = None,
    condition: str | None = None,
) -> dict[str, Domain]:
    """The search space of ``target`` from the YAML at ``url``, every key and value checked.

    A key that is not a config key, or a value the config rejects (on top of ``preset`` and
    ``base`` overrides), is a ConfigError naming the YAML file and the key. Keys that cannot
    act in this sweep are dropped with a warning: the condition dropout without a
    ``condition``, and the refiner's widths with one (its weights then come from the bundle).
    """
    tree = read_yaml(url)
    section = tree.get(target)
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{url}: no search space for target {target!r} (a mapping of keys)")
    per_preset = ((tree.get("presets") or {}).get(preset) or {}).get(target) or {}
    space = {**section, **per_preset}
    domains: dict[str, Domain] = {}
    for key, spec in space.items():
        source = f"{url}: {target}"
        if key not in valid_keys():
            try:
                parse_override(f"{key}=0")  # its message suggests the closest valid key
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        domain = _domain(source, key, spec)
        for value in domain.probes():
            try:
                load_config(preset, None, [*(base or []), f"{key}={json.dumps(value)}"])
            except ConfigError as exc:
                why = str(exc).removeprefix("config: ")
                raise ConfigError(f"{source}: {key} = {json.dumps(value)}: {why}") from None
        domains[key] = domain
    if target == "refiner":
        drop = [k for k in domains if k.startswith("model.refiner.")] if condition else []
        drop += [] if condition else [k for k in domains if k == "model.condition.dropout"]
        for key in drop:
            why = "its weights come from the bundle" if condition else "no --condition"
            log.warning("%s: not searching %s (%s)", url, key, why)
            del domains[key]
    if not domains:
        raise ConfigError(f"{url}: nothing to search for target {target!r}")
    return domains
