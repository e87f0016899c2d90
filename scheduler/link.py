"""The host-to-device link emulator: every expert copy takes bytes / bandwidth + latency.

Only the transfer thread waits (the accelerator does not), so stalls, overlap and the policies'
differences can be measured on a CPU. Anything produced under emulation says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxmoe.errors import JaxmoeError


@dataclass(frozen=True)
class EmulatedLink:
    gbps: float  # gigabytes per second
    latency_us: float = 0.0

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / (self.gbps * 1e9) + self.latency_us * 1e-6

    def describe(self) -> str:
        return f"{self.gbps:g} GB/s + {self.latency_us:g} us"

    @classmethod
    def parse(cls, text: str) -> "EmulatedLink":
        """'GBPS[,LATENCY_US]' -> EmulatedLink; raises JaxmoeError naming --emulate-link."""
        parts = str(text).split(",")
        try:
            gbps = float(parts[0])
            latency = float(parts[1]) if len(parts) > 1 else 0.0
        except ValueError:
            raise JaxmoeError(f"--emulate-link {text!r}: expected GBPS[,LATENCY_US], e.g. 16,10") from None
        if len(parts) > 2 or gbps <= 0 or latency < 0:
            raise JaxmoeError(f"--emulate-link {text!r}: expected GBPS > 0 and LATENCY_US >= 0")
        return cls(gbps, latency)
