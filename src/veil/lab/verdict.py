"""What a detector says about one flow (or one probed server): flagged or not, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """One detector's judgement of one flow.

    ``flagged`` is what a censor running this detector would act on. ``applicable`` is False
    when the flow offers nothing this detector looks at (no ClientHello for the fingerprint
    detector, a UDP flow for the fully-encrypted rule): such a verdict is never flagged, and
    reports count it apart from the flows that were judged and passed.
    """

    detector: str
    """The detector's short name, e.g. ``fully-encrypted``."""
    flagged: bool
    """True when the detector would block (or single out for probing) this flow."""
    evidence: tuple[str, ...] = ()
    """Human-readable reasons, for a flagged verdict and for a pass alike."""
    labels: tuple[str, ...] = ()
    """Machine-readable names of what was recognised, e.g. ``("openvpn-udp",)``."""
    applicable: bool = True
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    """Measured values (JSON-serialisable), e.g. the JA4 string or the Ex1 pop count."""

    def __post_init__(self) -> None:
        if self.flagged and not self.applicable:
            raise ValueError(f"{self.detector}: a verdict cannot be flagged and not applicable")

    @classmethod
    def not_applicable(cls, detector: str, why: str) -> Verdict:
        return cls(detector, False, (why,), applicable=False)

    def to_json(self) -> dict[str, Any]:
        return {"detector": self.detector, "flagged": self.flagged,
                "applicable": self.applicable, "evidence": list(self.evidence),
                "labels": list(self.labels), "details": self.details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        return cls(str(data["detector"]), bool(data["flagged"]),
                   tuple(str(e) for e in data.get("evidence", ())),
                   tuple(str(x) for x in data.get("labels", ())),
                   bool(data.get("applicable", True)), dict(data.get("details", {})))
