"""`Speculation`: when a decode step should run as one whole-token program over the slot cache.

The layer-by-layer decode path waits for each MoE layer's routing decision on the host (device ->
host), chooses slots, then dispatches the next program: per MoE layer one round trip during which the
device idles, and host work the device waits for. When every expert a token routes to is already in
the cache, none of that is needed: one jitted program can run the whole token, looking each routed
expert's slot up in a device-side copy of the slot table taken when the token is dispatched. The
program reports the first MoE position whose routing found an expert outside the cache; when there is
one, the runtime discards the program's work from that position on and finishes the token layer by
layer from the hidden state that entered it (the KV cache rows of the discarded layers are rewritten
at the same position, so the result is what the layer path computes).

Whether to speculate is a cost decision. Per token, with
  q       the expected fraction of the MoE positions that the layer path must redo (0 when the token's
          experts were all resident at its start, (P - m) / P when position m is the first miss),
  t_spec  the period of a token that speculated and succeeded,
  t_layer the period of a token that ran layer by layer with every expert resident,
speculating costs about t_spec + q * t_layer and not speculating t_layer, so the runtime speculates when
t_spec < (1 - q) * t_layer. q is measured on every token: a token that ran layer by layer checks what a
speculation would have found (its routing against the table at its start). The two periods are
measured in their own mode (each is tried `MIN_SAMPLES` times first); a token that compiled anything
is not timed. Units: seconds; the periods are the decode loop's, one `decode` call to the next.
"""

from __future__ import annotations

MODES = ("auto", "on", "off")
MIN_SAMPLES = 2  # timed tokens of each mode before the cost rule decides
EMA = 0.2  # weight of the newest token in the running estimates


class Speculation:
    """mode: auto (the cost rule above), on (every decode step; tests, benchmarks), off (never)."""

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"speculation mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.redo_fraction: float | None = None  # q: EMA of the fraction of MoE positions to redo
        self.spec_period_s: float | None = None  # t_spec
        self.layer_period_s: float | None = None  # t_layer
        self.spec_samples = self.layer_samples = 0

    def should_speculate(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        q = self.redo_fraction
        if q is None or q >= 0.5:  # no token seen yet, or most tokens would fall back early
            return False
        if self.spec_samples < MIN_SAMPLES:
            return True
        if self.layer_samples < MIN_SAMPLES:
            return False
        return self.spec_period_s < (1.0 - q) * self.layer_period_s

    def record(self, speculated: bool, redo_fraction: float, period_s: float | None) -> None:
        """One decode token: whether it speculated, the fraction of its MoE positions the layer path ran
        (or would have run, had it speculated) after a miss, and its period (None: not timed)."""
        q = self.redo_fraction
        self.redo_fraction = redo_fraction if q is None else (1 - EMA) * q + EMA * redo_fraction
        if period_s is None or redo_fraction > 0:  # only all-resident tokens time either mode
            return
        if speculated:
            self.spec_period_s = _ema(self.spec_period_s, period_s)
            self.spec_samples += 1
        else:
            self.layer_period_s = _ema(self.layer_period_s, period_s)
            self.layer_samples += 1

    def as_dict(self) -> dict:
        return {"mode": self.mode, "redo_fraction": self.redo_fraction, "spec_period_s": self.spec_period_s,
                "layer_period_s": self.layer_period_s}


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
