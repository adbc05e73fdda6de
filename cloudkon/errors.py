"""The exception hierarchy of CloudKon-py.

Owns every exception the framework raises on purpose.  A task that fails is not an
exception: it is a result with an exit code (see tasks.py).  The AWS errors (AWSError and
its subclasses, typed by what callers act on) are made from boto's in one place only,
aws.aws_errors, so that no caller reads an AWS error code.
"""

from __future__ import annotations


class CloudKonError(Exception):
    """Base class of every error raised by CloudKon-py."""


class ConfigError(CloudKonError):
    """Raised when a command-line option, a setting or an environment variable is invalid."""


class WorkloadError(ConfigError):
    """Raised when a workload file cannot be read or holds no task.

    ``line`` is the 1-based line number at fault, when one line is at fault.
    """

    def __init__(self, message: str, path: str = "", line: int | None = None) -> None:
        where = f"{path}:{line}: " if line is not None else (f"{path}: " if path else "")
        super().__init__(where + message)
        self.path = path
        self.line = line


class ResultsFileError(ConfigError):
    """Raised when a results file given to report on (client.py --report) is not one: its message
    names the file and, when one line is at fault, the line."""


class ProtocolError(CloudKonError):
    """Raised when bytes from a peer do not form a valid message."""


class FrameTooLarge(ProtocolError):
    """Raised when a length prefix announces more than the allowed frame size.

    Raised before anything of that size is allocated.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class IncompleteFrame(ProtocolError):
    """Raised when the peer closed the connection in the middle of a frame."""

    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"connection closed after {len(partial)} of {expected} bytes")
        self.partial = partial
        self.expected = expected


class MalformedMessage(ProtocolError):
    """Raised when a frame is not UTF-8 JSON, or not a known message of the right shape.

    ``data`` keeps (the start of) the offending bytes for the log.
    """

    def __init__(self, reason: str, data: bytes = b"") -> None:
        super().__init__(reason)
        self.data = data[:200]


class BadRequest(ProtocolError):
    """Raised when a well-formed message asks for something the receiver refuses.

    ``code`` is the machine-readable reason sent back in the error message.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(ProtocolError):
    """Raised when the peer answered with an error message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class RefusedMessage(ProtocolError):
    """Raised when a message body off a queue is unsigned, or not signed by a known, unexpired key."""


class BackendError(CloudKonError):
    """Raised when a backend cannot run, queue or report tasks."""


class AWSError(BackendError):
    """Raised when an AWS call failed (aws.aws_errors made it from boto's error).

    ``code`` is AWS's error code (``ThrottlingException``, ``AccessDenied``...), None when AWS
    gave none (no answer at all).
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientAWSError(AWSError):
    """Raised when an AWS call failed for a reason that may pass by itself: no answer (unreachable,
    reset, timed out), throttling, a server error, or a queue name deleted moments ago (SQS takes
    it again after 60 s)."""


class QueueGone(AWSError):
    """Raised when an SQS queue named or addressed does not exist (deleted, or never made)."""


class ConditionFailed(AWSError):
    """Raised when a DynamoDB conditional write was refused because its condition did not hold."""


class ResourceNotFound(AWSError):
    """Raised when an AWS resource other than a queue does not exist: a DynamoDB table, an SNS
    subscription, an S3 bucket or its lifecycle configuration."""


class AlreadyExists(AWSError):
    """Raised when an AWS resource to create exists already (made meanwhile by another scheduler
    or worker, or by us before)."""


class CapacityRefused(AWSError):
    """Raised when EC2 refused to launch for want of capacity or of a limit, for this instance type,
    subnet (its zone) or market: the next type or subnet may be granted (capacity.py tries them)."""
