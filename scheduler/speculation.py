"""`Speculation`: when a decode step should run as one whole-token program over the slot cache.

The layer-by-layer decode path waits for each MoE layer's routing decision on the host (device ->
host), chooses slots, then dispatches the next program: per MoE layer one round trip during which the
device idles, and host work the device waits for. When every expert a token routes to is already in
the cache, none of that is needed: one jitted program can run the whole token, looking each routed
expert's slot up in a device-side copy of the slot table taken when the token is dispatched. The
program reports the first MoE position whose routing found an expert outside the cache; when there is
one, the runtime discards the program's work from that position on and finishes the token layer by
layer from the hidden state that entered it (the KV cache rows of the discarded layers are rewritten
at the same position; running states, Gated DeltaNet's, come back from the program as they were before the
token for those layers, since stepping them twice is not idempotent; so the result is what the layer path
computes).

Whether to speculate is a cost decision, made per token from a linear model of each mode's period:

  x        the token's redo fraction: (P - m) / P when MoE position m is its first expert that was not
           in the cache when the token started, 0 when there is none;
  t_mode(x) = a_mode + b_mode * x  for mode = spec (whole-token program first) and layer (layer path):
           a: the period of a token with every expert cached; b: what the misses add, per unit of x
           (a speculating token redoes its tail layer by layer after the wasted work of the program, and
           is not prefetched into during its head; a layer-path token stalls on its misses);
  q_mode   the running mean of x in that mode.

The runtime speculates when a_spec + b_spec q_spec < a_layer + b_layer q_layer. Every token measures x,
also one that ran layer by layer (its routing checked against the table at its start: what a
speculation would have found). x depends on the mode: the layer path plans prefetches after every
layer, a successful whole-token step only after its last, so under speculation later tokens find
fewer of their experts (q_spec 0.15-0.3 against q_layer 0.1 on the default model at 50% cache under the
oracle). So each mode keeps its own q, and a token moves the other mode's q towards its x with a small
weight (`FORGET`): an estimate the runtime no longer measures drifts to the measured one, and a mode
given up is tried again once that makes it look cheaper. a and b are measured in their own mode (a
each `MIN_SAMPLES` times first, b from the tokens with x > 0; until measured b_spec is taken as a_layer
+ b_layer, the layer path's cost for the tail, and b_layer as 0). Above q_spec = `MAX_REDO` the layer
path runs without trying. A token that compiled anything is not timed. Units: seconds; a period runs
from one `decode` call to the next.

The whole-token program's first run in a process, per KV cache length, traces and compiles it (or loads
it from the persistent cache): 0.5 s on the default model on CPU, where it then saves about 3 ms per
token. So a generation that would compile it speculates only if the tokens it has left are expected to
repay that: (tokens left) * (t_layer(q_layer) - t_spec(q_spec)) > startup, with a_spec taken as a_layer / 2 until
measured, and the startup as the largest measured so far, the whole-token program's own or, before it
ever ran, the layer path's (its first decode step's period minus a_layer).
"""

from __future__ import annotations

MODES = ("auto", "on", "off")
MIN_SAMPLES = 2  # all-cached tokens of each mode timed before the cost rule decides
MAX_REDO = 0.5  # q above which the layer path runs without trying the whole-token program
EMA = 0.2  # weight of the newest token in the running estimates of its own mode
FORGET = 0.1  # weight of the newest token in the other mode's q


class Speculation:
    """mode: auto (the cost rule above), on (every decode step; tests, benchmarks), off (never)."""

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"speculation mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.redo_fraction = {True: None, False: None}  # q, by whether the token speculated
        self.base_s = {True: None, False: None}  # a, by whether the token speculated
        self.per_redo_s = {True: None, False: None}  # b
        self.samples = {True: 0, False: 0}  # tokens timed into a
        self.startup_period_s = {True: None, False: None}  # the longest period of a step that compiled

    def period_s(self, speculate: bool, q: float) -> float | None:
        """The model's expected period of a token in that mode at redo fraction q (None: a unknown)."""
        a_layer, b_layer = self.base_s[False], self.per_redo_s[False] or 0.0
        if not speculate:
            return None if a_layer is None else a_layer + b_layer * q
        a_spec, b_spec = self.base_s[True], self.per_redo_s[True]
        if a_spec is None:
            if a_layer is None:
                return None
            a_spec = a_layer / 2
        if b_spec is None:
            if a_layer is None:
                return None
            b_spec = a_layer + b_layer
        return a_spec + b_spec * q

    def should_speculate(self, tokens_left: int | None = None, compiled: bool = True) -> bool:
        """tokens_left: decode steps still to come in this generation, this one included (None: unknown);
        compiled: whether the whole-token program has run for this KV cache length already."""
        if self.mode != "auto":
            return self.mode == "on"
        q_spec, q_layer = self.redo_fraction[True], self.redo_fraction[False]
        if q_spec is None or q_spec >= MAX_REDO:  # no token seen yet, or most tokens would fall back early
            return False
        spec, layer = self.period_s(True, q_spec), self.period_s(False, q_layer)
        if not compiled and tokens_left is not None:
            if spec is None or layer is None or tokens_left * (layer - spec) <= self.startup_s():
                return False
        if self.samples[True] < MIN_SAMPLES:
            return True
        if self.samples[False] < MIN_SAMPLES:
            return False
        return spec < layer

    def startup_s(self) -> float:
        """The expected one-time cost of the whole-token program's first run (seconds; inf: unknown)."""
        for mode in (True, False):
            if self.startup_period_s[mode] is not None:
                return max(0.0, self.startup_period_s[mode] - (self.base_s[mode] or 0.0))
        return float("inf")

    def record(self, speculated: bool, redo_fraction: float, period_s: float, compiled: bool = False) -> None:
        """One decode token: whether it speculated, its redo fraction x (see above: had it speculated, for
        a layer-path token), its period, and whether it compiled anything (then its period measures a
        startup, not the mode)."""
        for mode, weight in ((speculated, EMA), (not speculated, FORGET)):
            q = self.redo_fraction[mode]
            self.redo_fraction[mode] = redo_fraction if q is None else (1 - weight) * q + weight * redo_fraction
        if compiled:
            self.startup_period_s[speculated] = max(self.startup_period_s[speculated] or 0.0, period_s)
            return
        base = self.base_s[speculated]
        if redo_fraction == 0:
            self.base_s[speculated] = _ema(base, period_s)
            self.samples[speculated] += 1
        elif base is not None:
            self.per_redo_s[speculated] = _ema(self.per_redo_s[speculated], max(0.0, period_s - base) / redo_fraction)

    def as_dict(self) -> dict:
        q_spec, q_layer = self.redo_fraction[True] or 0.0, self.redo_fraction[False] or 0.0
        return {"mode": self.mode, "whole_token_redo_fraction": self.redo_fraction[True],
                "layer_redo_fraction": self.redo_fraction[False],
                "whole_token_period_s": self.period_s(True, q_spec), "layer_period_s": self.period_s(False, q_layer),
                "startup_s": self.startup_s() if self.mode == "auto" else None}


def redo_fraction(first_miss: int, num_positions: int) -> float:
    """x of a token whose first MoE position with an expert outside the cache is `first_miss` (num_positions
    when there is none): the share of its MoE positions from there on, (P - m) / P."""
    return (num_positions - first_miss) / num_positions


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
