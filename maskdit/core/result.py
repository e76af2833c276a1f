"""What a step hands to the next one: a typed result, written as `result.json` beside its outputs.

Every step is `run(<Step>Config) -> <Step>Result`. The result is written atomically through
`maskdit.core.storage` next to what the step produced (a dataset folder, a checkpoint folder, an
evaluation folder), so it is still there on object storage after the pod that wrote it is gone
(a PyTorchJob's pods, a KFP step's pod). Pipeline steps read it back with `read_result`; nothing
parses a command's stdout or a pod's log for a result.

Where a result goes: `<folder>/result.json` for a step whose output is a folder, and
`<file>.result.json` for a step whose output is one file (`fid-stats --out ref.npz`).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field

from maskdit import __version__
from maskdit.core import storage
from maskdit.core.config import StrictModel
from maskdit.core.errors import UserError

RESULT_FILE = "result.json"
R = TypeVar("R", bound="StepResult")


class ResultError(UserError, RuntimeError):
    """A step's result.json is missing, unreadable, or of another step; the message names the URI."""


class StepResult(StrictModel):
    """Base of every step's result. Each subclass sets `kind: Literal["<step>"] = "<step>"`, so a
    result is never read as another step's."""

    kind: str
    maskdit_version: str = Field(default=__version__, description="the maskdit that wrote the result")

    @classmethod
    def step_name(cls) -> str:
        return cls.model_fields["kind"].default

    def write(self, uri: str) -> str:
        """Write this result atomically to `uri` (a result.json URI); return the URI."""
        storage.put_bytes(uri, self.model_dump_json(indent=1).encode())
        return uri


def result_uri(out: str, is_file: bool = False) -> str:
    """Where the result of a step that wrote `out` (a folder, or with `is_file` one file) lives."""
    out = str(out).rstrip("/")
    return f"{out}.{RESULT_FILE}" if is_file else storage.join(out, RESULT_FILE)


def read_result(cls: type[R], uri: str, within: str | None = None, outputs: tuple[str, ...] = ("grid",)) -> R:
    """The `cls` result stored at `uri`, with a clear error when it is missing or of another step.

    With `within` (the run's own folder), each of the result's `outputs` that is set must lie under it:
    a step shows (embeds in a KFP card) only what its run wrote, never a file a result.json points at.
    """
    result = _read(cls, uri)
    for name in outputs if within else ():
        value = getattr(result, name, None)
        if value and not storage.inside(value, within):
            raise ResultError(f"{uri}: {name} {str(value)[:300]!r} lies outside the run's folder {within}; a step "
                              "reads only its own run's outputs: rerun the step into a fresh folder")
    return result


def _read(cls: type[R], uri: str) -> R:
    try:
        raw = storage.get_bytes(uri)
    except storage.ObjectNotFound:
        raise ResultError(f"no step result at {uri}: the {cls.step_name()} step did not finish there (look at "
                          "its log), or the URI is wrong") from None
    try:
        return cls.model_validate_json(raw)
    except Exception as error:  # pydantic's ValidationError, or JSON that is not an object
        raise ResultError(f"{uri} is not a {cls.step_name()} result of this maskdit ({__version__}): {error}") from None
