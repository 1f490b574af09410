"""The registry of allocation rules: one line per rule (the CLI's `--allocation` choices)."""

from __future__ import annotations

from .bits import BitsRule
from .loss import LossRule
from .rule import Rule
from .uniform import UniformRule
from .welore import WeLoreRule

RULES: dict[str, type[Rule]] = {
    "welore": WeLoreRule,
    "uniform": UniformRule,
    "loss": LossRule,
    "bits": BitsRule,
}


def register(name: str, rule: type[Rule]) -> type[Rule]:
    """Make `rule` available as `--allocation name`."""
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(f"{rule!r} is not a welore.allocate.Rule subclass")
    RULES[name] = rule
    return rule
