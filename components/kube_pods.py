"""What the training job's pods say: OOM kills, evictions and failed containers (each once), and why one is Pending.

Read from the pods' status alone, so it is the same for both job kinds (components/jobkind.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskdit.core.errors import is_retryable_exit


@dataclass
class Incidents:
    """OOM kills, evictions and failed containers of the job's pods, each reported once."""

    out: object
    seen: dict[tuple, str] = field(default_factory=dict)

    def note(self, pods: list[dict]) -> None:
        for pod in pods:
            meta, status = pod["metadata"], pod.get("status") or {}
            name = meta["name"]
            if status.get("reason") == "Evicted":
                self._add((meta["uid"], "evicted"), f"pod {name}: Evicted: {status.get('message', '')}")
            for c in status.get("containerStatuses") or []:
                for ended in ((c.get("lastState") or {}).get("terminated"), (c.get("state") or {}).get("terminated")):
                    if not ended or ended.get("exitCode", 0) == 0:
                        continue
                    key = (meta["uid"], ended.get("containerID") or ended.get("finishedAt"))
                    kind = "retryable" if is_retryable_exit(ended["exitCode"]) else "permanent"
                    self._add(key, f"pod {name}: container {c['name']} {ended.get('reason') or 'failed'} "
                                   f"(exit code {ended['exitCode']}: {kind}, {c.get('restartCount', 0)} restarts)")

    def _add(self, key: tuple, text: str) -> None:
        if key not in self.seen:
            self.seen[key] = text
            print(f"[launcher] {text}", file=self.out, flush=True)

    def __str__(self) -> str:
        return "".join(f"\n  {text}" for text in self.seen.values())


def pending_reason(pod: dict) -> str:
    """Why a Pending pod does not run: the scheduler's message, else its container's waiting reason."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}"
    for c in status.get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting:
            return f"container {c['name']} waiting: {waiting.get('reason', '')} {waiting.get('message', '')}".strip()
    return "not scheduled yet"
