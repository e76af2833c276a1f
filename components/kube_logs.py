"""The training job's logs: follow the master's across restarts, save every replica's beside the checkpoints.

The master's log is read with `timestamps=true`; after a dropped stream the follower re-attaches with
`sinceTime` = the last time stamp it saw. The API server applies sinceTime at whole seconds, so lines of that
second come again: those older than the last one seen, and as many copies of each line at the last time stamp
as were already seen, are skipped - no line twice, none lost. A container restart (restartCount up) is caught up
through `previous=true` (the kubelet keeps one terminated container), a re-created pod (new uid) is read from
its start. A stream opened just before the master was re-created is still the old pod's, and that pod's log is
gone once it is deleted: it is kept unless its first line is in the new pod's log (then the log was opened by
name just after the re-creation, on the new pod). Everything the follower saw is spooled to a local file; at
the end it goes to `<checkpoint_uri>/logs/<pod>.log`, as do the other replicas' logs (previous container, then current).
"""

from __future__ import annotations

import collections
import itertools
import re
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from components.kube_calls import Calls, describe, http_status
from maskdit.core import storage

IDLE_FACTOR = 10  # a follow stream silent for 10 per-call timeouts is re-opened (a half-dead connection)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def stamp_ns(stamp: str) -> int:
    """An RFC3339(Nano) time stamp as integer nanoseconds since the epoch (exact, any offset)."""
    m = _STAMP.match(stamp)
    if not m:
        raise ValueError(f"not an RFC3339 time stamp: {stamp!r}")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    seconds = int(datetime.fromisoformat(m.group(1) + zone).timestamp())
    return seconds * 10**9 + int((m.group(2) or "0").ljust(9, "0"))


def _since(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_status(pod: dict, container: str) -> dict | None:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == container:
            return c
    return None


class MasterLog(threading.Thread):
    """Follows the job's current master pod; prints `[pod] line`, spools every line once, keeps the tail."""

    def __init__(self, calls: Calls, job: str, *, poll_s: float, tail_lines: int, until: float, out):
        super().__init__(daemon=True, name=f"log-{job}")
        self.calls, self.job, self.poll_s, self.out = calls, job, poll_s, out
        self.pod_name = ""
        self.lines = 0
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._uid = ""
        self._restarts = 0
        self._hwm: int | None = None  # the last time stamp seen (ns), and the lines seen at it
        self._at_hwm: collections.Counter[str] = collections.Counter()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._response = None
        self._last_notice = ""
        self._tmp = tempfile.TemporaryDirectory(prefix="maskdit-log-")
        self.spool = Path(self._tmp.name, "master.log")
        self._spool = open(self.spool, "w", encoding="utf-8")
        self.until = until  # its calls retry until then (monotonic): the step's deadline plus the cleanup time

    # --- the thread ---
    def run(self) -> None:
        final_tries = 3
        while True:
            final = self._halt.is_set()
            settled = True
            try:
                settled = self._pass(follow=not final)
            except Exception as error:
                self._notice(f"the master's log: {describe(error)}")
            if final:
                final_tries -= 1
                if settled or not final_tries:
                    self._spool.flush()
                    return
            elif settled:
                self._halt.wait(self.poll_s)

    def finish(self, timeout: float) -> None:
        """Stop following (cut the open stream), let the thread catch up on the last lines, wait for it."""
        with self._lock:
            self._halt.set()
            if self._response is not None:
                try:
                    self._response.shutdown()
                except (RuntimeError, ValueError, OSError):
                    pass
        if self.is_alive():
            self.join(timeout)

    @property
    def started(self) -> bool:
        return self.ident is not None

    def saved(self) -> Path | None:
        """The spool file of every master line seen (flushed), None when there were none."""
        self._spool.flush()
        return self.spool if self.lines else None

    def close(self) -> None:
        self._spool.close()
        self._tmp.cleanup()

    def tail(self) -> str:
        return "\n".join(self._tail)

    def _notice(self, text: str) -> None:
        if text != self._last_notice:
            self._last_notice = text
            print(f"[launcher] {text}", file=self.out, flush=True)

    # --- one look at the master ---
    def _master(self) -> dict | None:
        pods = self.calls.list_pods(self.calls.kind.master(self.job), until=self.until)
        return pods[0] if pods else None

    def _pass(self, follow: bool) -> bool:
        """Read what is new in the master's log (following it while it runs); False if it changed meanwhile."""
        pod = self._master()
        status = _container_status(pod or {}, self.calls.kind.container) or {}
        state, last = status.get("state") or {}, status.get("lastState") or {}
        if not ("running" in state or "terminated" in state or "terminated" in last):
            return True  # no master, or not started yet
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        if uid != self._uid:
            if self._uid:
                self._notice(f"master pod {name} was re-created: following the new one")
            self.pod_name, self._uid, self._restarts, self._hwm = name, uid, 0, None
            self._at_hwm.clear()
        restarts = status.get("restartCount", 0)
        if restarts > self._restarts:
            if self.lines:
                self._notice(f"master container of {name} restarted ({restarts} restarts): continuing its log")
            try:
                if not self._read(name, (uid, restarts), previous=True, follow=False):
                    return False
            except Exception as error:
                if http_status(error) != 400:  # 400: no previous container kept (restarted twice since)
                    raise
            self._restarts = restarts
        return self._read(name, (uid, restarts), previous=False, follow=follow and "running" in state)

    def _read(self, pod: str, expect: tuple[str, int], previous: bool, follow: bool) -> bool:
        """Read one container's log from the last time stamp seen; False if the master is no longer the
        (uid, restartCount) `expect`ed, so that the caller looks again.

        After a restart the log opened may be the new instance's: it is left unread (the old one is caught up
        through `previous=true`). After a re-creation the old pod's log is gone for good, so the stream is read
        unless its first line is in the new master's log (then it is the new pod's, read from its start next).
        """
        query = [("container", self.calls.kind.container), ("timestamps", "true")]
        query += [("previous", "true")] if previous else []
        query += [("follow", "true")] if follow else []
        query += [("sinceTime", _since(self._hwm))] if self._hwm is not None else []
        response = self.calls.open_log(pod, query, until=self.until,
                                       idle_s=self.calls.call_timeout_s * IDLE_FACTOR if follow else None)
        try:
            now = self._master()
            restarts = (_container_status(now or {}, self.calls.kind.container) or {}).get("restartCount", 0)
            replaced = now is None or now["metadata"]["uid"] != expect[0]
            if not replaced and restarts != expect[1]:
                return False
            if follow:  # published, so that finish() can cut it
                with self._lock:
                    if self._halt.is_set():
                        return True
                    self._response = response
            lines = _lines(response)
            if replaced:
                first = next(lines, None)
                if first is None or (now is not None and self._logged(now, first)):
                    return False
                lines = itertools.chain([first], lines)
            replay = collections.Counter(self._at_hwm)
            for raw in lines:
                self._accept(pod, raw, replay)
            return not replaced
        finally:  # a cut stream raises here: its half line is dropped, the next read starts at its time stamp
            with self._lock:
                self._response = None
            response.release_conn()

    def _logged(self, pod: dict, raw: str) -> bool:
        """Whether time-stamped line `raw` is in `pod`'s current container's log (False if it has none yet)."""
        query = [("container", self.calls.kind.container), ("timestamps", "true")]
        try:
            query += [("sinceTime", _since(stamp_ns(raw.partition(" ")[0])))]
        except ValueError:
            pass
        try:
            response = self.calls.open_log(pod["metadata"]["name"], query, until=self.until)
        except Exception as error:
            if http_status(error) == 400:  # not started yet: it has printed nothing
                return False
            raise
        try:
            return raw in response.read().decode("utf-8", "replace").split("\n")
        finally:
            response.release_conn()

    def _accept(self, pod: str, raw: str, replay: collections.Counter) -> None:
        stamp, _, text = raw.partition(" ")
        try:
            ns = stamp_ns(stamp)
        except ValueError:  # not time-stamped (never from a kubelet): keep it, it cannot be matched
            ns, text = self._hwm or 0, raw
        if self._hwm is not None and ns < self._hwm:
            return
        if ns == self._hwm:
            if replay[text] > 0:
                replay[text] -= 1
                return
            self._at_hwm[text] += 1
        else:
            self._hwm = ns
            self._at_hwm = collections.Counter({text: 1})
            replay.clear()  # past the last time stamp seen: nothing more comes again
        self.lines += 1
        self._tail.append(text)
        self._spool.write(text + "\n")
        print(f"[{pod}] {text}", file=self.out, flush=True)


def _lines(response):
    """The lines of a log response as they arrive; a last line without a newline counts at a clean end."""
    buffer = b""
    for chunk in response.stream(64 * 1024):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            yield raw.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def _read_all(calls: Calls, pod: dict, until: float) -> bytes:
    """A pod's log: its previous container's (if it restarted), then the current one's."""
    name = pod["metadata"]["name"]
    parts = []
    restarts = (_container_status(pod, calls.kind.container) or {}).get("restartCount", 0)
    for previous in ([True] if restarts else []) + [False]:
        query = [("container", calls.kind.container)] + ([("previous", "true")] if previous else [])
        try:
            response = calls.open_log(name, query, until=until)
        except Exception as error:
            if http_status(error) == 400:  # not started, or no previous container kept
                continue
            raise
        try:
            parts.append(response.read())
        finally:
            response.release_conn()
    return b"".join(parts)


def save_replica_logs(calls: Calls, job, follower: MasterLog, until: float) -> dict[str, str]:
    """Save every replica's log to `<checkpoint_uri>/logs/<pod>.log` (atomic writes); return pod -> URI.

    The master's comes from the follower (every container and pod it followed); a failure to read or save
    one log is reported and skipped: logs are diagnostics, never the job's outcome.
    """
    uris: dict[str, str] = {}

    def save(pod: str, write) -> None:
        uri = storage.join(job.checkpoint_uri, "logs", f"{pod}.log")
        try:
            write(uri)
            uris[pod] = uri
        except Exception as error:
            print(f"[launcher] could not save the log of {pod} to {uri}: {describe(error)}", file=follower.out,
                  flush=True)

    spool = follower.saved()
    if spool is not None:
        save(follower.pod_name, lambda uri: storage.put_file(spool, uri))
    try:
        pods = calls.list_pods(calls.kind.pods(job.name), until=until)
    except Exception as error:
        print(f"[launcher] could not list the pods of {job.name} to save their logs: {describe(error)}",
              file=follower.out, flush=True)
        pods = []
    for pod in pods:
        name = pod["metadata"]["name"]
        if name not in uris:
            save(name, lambda uri, pod=pod: storage.put_bytes(uri, _read_all(calls, pod, until)))
    return uris
