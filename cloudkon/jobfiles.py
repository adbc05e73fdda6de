"""The files of a submission's job descriptions, on the client's side.

Owns ``JobFiles``: checking where the output sandboxes go (``--outputs DIR``) before any
work is done, staging the inputs once the job's id is known (local paths for local
workers on this machine, an S3 archive per task for remote ones, through s3staging.py)
and bringing the remote tasks' outputs back into DIR/<task id>/.  Relies on S3 only
through s3staging.py, loaded only when a scheduler stages to S3 (so local runs need no
boto3).  Not the sandbox a task runs in (sandbox.py).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from cloudkon.errors import CloudKonError, ConfigError
from cloudkon.jdl import JobSpec
from cloudkon.results import Results


class JobFiles:
    """The job descriptions of a submission: staged once the job's id is known, outputs brought back."""

    def __init__(self, specs: dict[int, JobSpec], outputs: str | None) -> None:
        if outputs is None and any(spec.outputs for spec in specs.values()):
            raise ConfigError("a job description has an output sandbox: say where it goes with --outputs DIR")
        self.specs = specs
        self.outputs = Path(outputs).resolve() if outputs else None
        if self.outputs is not None:
            try:  # now, rather than once the work is done
                self.outputs.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--outputs {outputs}: {exc.strerror or exc}") from None
            if not os.access(self.outputs, os.W_OK | os.X_OK):
                raise ConfigError(f"--outputs {outputs}: not a folder this user can write to")

    def preparer(self, tasks: list[str], staging: str | None) -> Callable[[str], list[str]] | None:
        """What SchedulerConnection.submit calls with the job's id; None if there is nothing to stage.

        ``staging`` is the scheduler's (its welcome says): local:HOST for local workers, which
        read the inputs where they are and move the outputs into place (so HOST must be this
        machine); an s3:// prefix for remote ones.
        """
        if not self.specs:
            return None
        if staging is None or staging.startswith("local:") and staging != f"local:{socket.gethostname()}":
            raise ConfigError(f"job descriptions need a scheduler with remote workers, or one with local "
                              f"workers on this machine (this scheduler's workers are on "
                              f"{(staging or 'local:?').removeprefix('local:')})")
        # Loaded here: a workload of plain commands, the common case, needs no sandbox code.
        from cloudkon.sandbox import staged_command

        def prepare(job: str) -> list[str]:
            commands = list(tasks)
            uploader = None
            if not staging.startswith("local:"):
                from cloudkon.s3staging import InputUploader  # boto3 is needed for remote staging only
                uploader = InputUploader(staging, job)
            for task_id, spec in self.specs.items():
                if uploader is not None:
                    commands[task_id] = staged_command(spec, uploader.output_url(task_id),
                                                       uploader.upload(spec))
                else:
                    deliver = str(self.outputs / str(task_id)) if self.outputs else ""
                    commands[task_id] = staged_command(spec, deliver)
            return commands
        return prepare

    def bring_back(self, results: Results) -> None:
        """Download and check the output archives of remote tasks into DIR/<task id>/."""
        remote = {task_id: a for task_id, a in results.artifacts.items() if "url" in a}
        if not remote or self.outputs is None:
            return
        from cloudkon.s3staging import fetch_outputs  # boto3: only once remote tasks left outputs in S3
        for task_id, artifact in sorted(remote.items()):
            try:
                fetch_outputs(artifact, self.outputs / str(task_id))
            except (CloudKonError, OSError, KeyError, TypeError, ValueError) as exc:
                results.fail(task_id, f"outputs not brought back: {exc}")
