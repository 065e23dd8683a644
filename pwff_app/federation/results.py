"""Per-round records and the run summary on disk: ``rounds.jsonl`` and ``summary.json``.

``rounds.jsonl`` gets one line per round as soon as the round ends (flushed), so a run that
dies later keeps what it measured. ``summary.json`` is written at the end; other tools read
these fields: ``method``, ``num_rounds``, ``num_clients``, ``params``, ``accuracy`` (task
methods) or ``reward`` (instruction methods), ``comm`` and ``wireless``.

Besides a client's own score, a round may carry *views* of it (:data:`VIEWS`): the task
family's ``global_accuracy`` (the client's model on the global test set) and
``shared_only_accuracy`` (PFTT's shared part alone on it). A round then has
``<view>_accuracy_mean``, and ``summary.json``'s ``accuracy`` block ``<view>_per_client`` /
``<view>_mean`` (each client's value in the last round that measured it).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pwff_app.files import write_json_atomic


VIEWS: tuple[str, ...] = ("global", "shared_only")
"""Prefixes of per-client score views: ``<view>_<score_key>`` in a client's round record."""


def default_run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunRecorder:
    """Collects per-client numbers during a round and writes them out when it ends.

    Strategies call :meth:`client` with whatever they learn about a client (metrics, bytes);
    :meth:`end_round` merges in extra per-round blocks (e.g. the wireless link's) from the
    ``extra`` callbacks, prints one line and appends the round to ``rounds.jsonl``.
    """

    def __init__(self, out_dir: Path, method: str, score_key: str = "accuracy", keep_rounds: int = 0) -> None:
        """Start ``rounds.jsonl`` afresh, or keep its first ``keep_rounds`` rounds (resuming)."""
        self.out_dir = out_dir
        self.method = method
        self.score_key = score_key
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_path = out_dir / "rounds.jsonl"
        old = self.rounds_path.read_text().splitlines() if keep_rounds and self.rounds_path.exists() else []
        self.rounds: list[dict[str, Any]] = [json.loads(line) for line in old if line.strip()][:keep_rounds]
        self.rounds_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rounds))
        self.extra: dict[str, Callable[[int], dict[str, Any]]] = {}
        self._current: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._info: dict[str, Any] = {}
        self._started = time.time()

    def client(self, client_id: int, **values: Any) -> None:
        """Record values for a client in the current round (later calls add keys)."""
        self._current.setdefault(int(client_id), {}).update(values)

    def event(self, kind: str, **details: Any) -> None:
        """Record a round event such as a rejected or failed reply, with its reason."""
        self._events.append({"kind": kind, **details})

    def round_info(self, **values: Any) -> None:
        """Record round-level values (e.g. ``sampled``: the client ids the round trains)."""
        self._info.update(values)

    def end_round(self, server_round: int) -> dict[str, Any]:
        clients = {cid: self._current[cid] for cid in sorted(self._current)}
        scores = [c[self.score_key] for c in clients.values() if self.score_key in c]
        record: dict[str, Any] = {
            "round": server_round,
            "clients": {str(cid): c for cid, c in clients.items()},
            f"{self.score_key}_mean": statistics.fmean(scores) if scores else None,
            f"{self.score_key}_min": min(scores) if scores else None,
            "uplink_bytes": sum(c.get("uplink_bytes", 0) for c in clients.values()),
            "downlink_bytes": sum(c.get("downlink_bytes", 0) for c in clients.values()),
            "events": self._events,
            "elapsed_s": round(time.time() - self._started, 3),
            **self._info,
        }
        for view in VIEWS:
            values = [c[f"{view}_{self.score_key}"] for c in clients.values() if f"{view}_{self.score_key}" in c]
            if values:
                record[f"{view}_{self.score_key}_mean"] = statistics.fmean(values)
        for name, fn in self.extra.items():
            record[name] = fn(server_round)
        self.rounds.append(record)
        with self.rounds_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self._print(record)
        self._current, self._events, self._info = {}, [], {}
        return record

    def _print(self, r: dict[str, Any]) -> None:
        mean, low = r[f"{self.score_key}_mean"], r[f"{self.score_key}_min"]
        score = f"{self.score_key} mean {mean:.4f} min {low:.4f}" if mean is not None else f"{self.score_key} n/a"
        score += "".join(f" | {view.replace('_', '-')} {r[f'{view}_{self.score_key}_mean']:.4f}"
                         for view in VIEWS if f"{view}_{self.score_key}_mean" in r)
        line = (f"[pwff] round {r['round']:>3} | {score} | up {r['uplink_bytes']:,} B | "
                f"down {r['downlink_bytes']:,} B")
        wireless = r.get("wireless")
        if wireless:
            line += f" | latency {wireless['latency_s']:.3f} s | lost {wireless['lost_updates']}"
        if r["events"]:
            line += f" | {len(r['events'])} rejected/failed"
        print(line, flush=True)  # one unwrapped line per round, also in piped logs

    def comm_block(self) -> dict[str, Any]:
        """Mean bytes per round per client and their total, each direction."""
        out = {}
        for direction in ("uplink", "downlink"):
            per_client: dict[str, list[int]] = {}
            for r in self.rounds:
                for cid, c in r["clients"].items():
                    if f"{direction}_bytes" in c:
                        per_client.setdefault(cid, []).append(c[f"{direction}_bytes"])
            means = {cid: round(statistics.fmean(v)) for cid, v in sorted(per_client.items(), key=lambda kv: int(kv[0]))}
            out[f"{direction}_bytes_per_round"] = {"per_client": means, "total": sum(means.values())}
        return out

    def _last(self, key: str) -> dict[str, Any]:
        """Each client's ``key`` in the last round that measured it, by client id."""
        last: dict[str, Any] = {}
        for r in self.rounds:
            for cid, c in r["clients"].items():
                if key in c:
                    last[cid] = c[key]
        return dict(sorted(last.items(), key=lambda kv: int(kv[0])))

    def final_scores(self) -> dict[str, Any]:
        """Each client's score in the last round it was measured, and their mean; likewise each
        :data:`VIEWS` entry that some round measured (``global_per_client``, ``global_mean``, ...)."""
        last = self._last(self.score_key)
        out = {"per_client": last, "mean": statistics.fmean(last.values()) if last else None}
        for view in VIEWS:
            values = self._last(f"{view}_{self.score_key}")
            if values:
                out.update({f"{view}_per_client": values, f"{view}_mean": statistics.fmean(values.values())})
        return out

    def private_params(self) -> dict[str, int]:
        """Each client's count of private (never sent) parameters, as its replies reported it."""
        out: dict[str, int] = {}
        for r in self.rounds:
            for cid, c in r["clients"].items():
                if "private_params" in c:
                    out[cid] = c["private_params"]
        return out

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` (recorder fields + ``summary``) and return its folder."""
        data = {
            "method": self.method,
            "num_rounds": sum(1 for r in self.rounds if r["round"] > 0),  # round 0 = a baseline evaluation
            self.score_key: self.final_scores(),
            "comm": self.comm_block(),
            "wall_s": round(time.time() - self._started, 3),
            **summary,
        }
        write_json_atomic(self.out_dir / "summary.json", data)
        return self.out_dir.resolve()
