"""`LoadReport`: what happened to every tensor of an adapter file, and which adapter parameters got no value."""

from __future__ import annotations

from dataclasses import dataclass, field

APPLIED = "applied"
IDENTICAL = "identical-to-base, skipped"
REFUSED = "refused: would overwrite a base weight"
UNEXPECTED = "unexpected: matches no adapter parameter"
BASE_APPLIED = "applied to a base weight (allowed by the caller)"


@dataclass
class TensorOutcome:
    key: str  # the key in the file
    action: str  # one of the constants above
    shape: tuple[int, ...]
    target: str | None = None  # the model parameter it went to (or would have)
    note: str = ""


@dataclass
class LoadReport:
    path: str
    adapter_name: str
    outcomes: list[TensorOutcome] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # adapter parameters that received no value
    # What the base fingerprint comparison concluded (checkpoint/fingerprint.py): "same base", "same architecture,
    # different weights (...)" (loaded only with check_base="warn"/"off"), "not verified (no fingerprint in file)".
    base_check: str = "not verified"
    notes: list[str] = field(default_factory=list)
    unknown_config_keys: list[str] = field(default_factory=list)

    def _with(self, action: str) -> list[str]:
        return [o.key for o in self.outcomes if o.action == action]

    @property
    def applied(self) -> list[str]:
        return self._with(APPLIED) + self._with(BASE_APPLIED)

    @property
    def skipped(self) -> list[str]:
        return self._with(IDENTICAL)

    @property
    def refused(self) -> list[str]:
        return self._with(REFUSED)

    @property
    def unexpected(self) -> list[str]:
        """File tensors that were not applied (matched nothing, or were refused)."""
        return self._with(UNEXPECTED) + self._with(REFUSED)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        return (
            f"adapter {self.adapter_name!r} from {self.path}: {len(self.applied)} applied, {len(self.skipped)} "
            f"identical-to-base skipped, {len(self.refused)} refused, {len(self._with(UNEXPECTED))} unexpected, "
            f"{len(self.missing)} missing; base: {self.base_check}"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        width = max((len(o.key) for o in self.outcomes), default=0)
        for o in self.outcomes:
            shape = "x".join(map(str, o.shape)) or "scalar"
            extra = f" -> {o.target}" if o.target and o.action != APPLIED else ""
            note = f" ({o.note})" if o.note else ""
            lines.append(f"  {o.key:<{width}}  {shape:>12}  {o.action}{extra}{note}")
        lines += [f"  MISSING {key}" for key in self.missing]
        if self.unknown_config_keys:
            lines.append(f"  config keys unknown to adapterkit, kept: {', '.join(self.unknown_config_keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
