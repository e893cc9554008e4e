"""Where Triton's time over the same runtime in process goes, stage model by stage model.

Both executors run the same volumes (interleaved, as the latency section does), each behind a
transport that times every call per model; Triton's statistics extension splits the served
calls into queue, input, compute and output on the server. What is left of a served call after
the server's own time is the wire: gRPC both ways and the client's tensor conversions.
"""

from __future__ import annotations

import time
from collections import defaultdict

from diffugts.pipeline import run_segmentation

from .harness import interleaved

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


class TimedTransport:
    """A transport that sums seconds and counts calls per model; everything else passes through."""

    def __init__(self, transport):
        self.transport = transport
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def infer(self, model: str, inputs: dict, outputs: list[str]) -> dict:
        start = time.perf_counter()
        try:
            return self.transport.infer(model, inputs, outputs)
        finally:
            self.seconds[model] += time.perf_counter() - start
            self.calls[model] += 1

    def __getattr__(self, name):
        return getattr(self.transport, name)


def server_statistics(client, headers: dict | None = None) -> dict[str, dict[str, float]]:
    """Cumulative seconds per model and phase, and its successful requests (`count`)."""
    stats = client.get_inference_statistics(as_json=True, headers=headers)
    out = {}
    for model in stats.get("model_stats", []):
        inference = model["inference_stats"]
        out[model["name"]] = {"count": int(inference["success"].get("count", 0)),
                              **{p: int(inference[p].get("ns", 0)) / 1e9 for p in PHASES}}
    return out


def _difference(after: dict, before: dict) -> dict:
    return {m: {k: v - before.get(m, {}).get(k, 0) for k, v in row.items()} for m, row in after.items()}


def stage_overhead(in_process, served, cases, statistics, repeats: int = 1) -> dict:
    """Per model, per volume: calls and milliseconds in process and through Triton, the server's
    phases, and what the wire adds (client time of a served call minus the server's).

    `statistics()` returns `server_statistics` of the server `served` talks to. The executors'
    transports are wrapped for the run and put back after it."""
    executors = {"in_process": in_process, "triton": served}
    originals = {name: ex.transport for name, ex in executors.items()}
    for ex in executors.values():
        ex.transport = TimedTransport(ex.transport)
    try:
        for ex in executors.values():  # warm-up, not counted
            run_segmentation(ex, cases[0][0], cases[0][2], cases[0][3])
            ex.transport.seconds.clear()
            ex.transport.calls.clear()
        before = statistics()
        for name, (volume, _, prompt, modality) in interleaved(list(executors), cases, repeats):
            run_segmentation(executors[name], volume, prompt, modality)
        server = _difference(statistics(), before)
    finally:
        timed = {name: ex.transport for name, ex in executors.items()}
        for name, ex in executors.items():
            ex.transport = originals[name]
    volumes = repeats * len(cases)
    models = sorted(set(timed["in_process"].calls) | set(timed["triton"].calls)
                    | {m for m, row in server.items() if row["count"]})
    report = {"volumes": volumes, "models": {}}
    for model in models:
        row = {name: {"calls": t.calls.get(model, 0) / volumes, "ms": 1e3 * t.seconds.get(model, 0.0) / volumes}
               for name, t in timed.items()}
        phases = server.get(model, {})
        direct, count = timed["triton"].calls.get(model, 0), phases.get("count", 0)
        # a model the client calls may also run inside an ensemble (the encoder in `score`): the
        # server's time is then shared out by calls, which have the same shapes either way
        share = direct / count if direct and count > direct else 1.0
        row["server_ms"] = {p: 1e3 * share * phases.get(p, 0.0) / volumes for p in PHASES}
        if direct:  # what the server's phases do not hold: gRPC, tensor conversions, request handling
            row["wire_ms"] = row["triton"]["ms"] - sum(row["server_ms"].values())
        report["models"][model] = row
    called = [row for row in report["models"].values() if "wire_ms" in row]  # by the client itself
    report["total_ms"] = {name: sum(r[name]["ms"] for r in called) for name in executors}
    report["total_ms"]["wire"] = sum(r["wire_ms"] for r in called)
    return report
