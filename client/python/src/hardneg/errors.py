"""Exceptions raised for failed calls: one class per gRPC status the server uses."""
from __future__ import annotations

import grpc


class HardnegError(Exception):
    """A call to the server failed.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode.INVALID_ARGUMENT``, ...).
        details: the server's message; for bad input it names the field, e.g.
            ``queries[0].vector[3]: must be finite``.
    """

    code: grpc.StatusCode

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def status(self) -> str:
        """The status name, e.g. ``"INVALID_ARGUMENT"``."""
        return self.code.name


class InvalidArgument(HardnegError):
    """A request field is out of range or malformed; the message names the field."""


class NotFound(HardnegError):
    """The collection does not exist."""


class AlreadyExists(HardnegError):
    """The collection exists already."""


class FailedPrecondition(HardnegError):
    """The collection's state refuses the call (e.g. text for a trainer-vector generation,
    a commit with documents lacking vectors, rerank without a cross-encoder)."""


class Unauthenticated(HardnegError):
    """No bearer token, or a wrong one."""


class ResourceExhausted(HardnegError):
    """The server is at its limit of in-flight calls or streams: retry with backoff."""


class Aborted(HardnegError):
    """Conflicts with a running refresh, or the refresh was cancelled."""


class Unavailable(HardnegError):
    """The server cannot be reached or is not ready, or ``min_generation`` did not come."""


class DeadlineExceeded(HardnegError):
    """The call ran past its deadline (the client's timeout or the server's limit)."""


_BY_CODE: dict[grpc.StatusCode, type[HardnegError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(code: grpc.StatusCode, details: str) -> HardnegError:
    """The exception for a status: its class from the table above, else ``HardnegError``."""
    return _BY_CODE.get(code, HardnegError)(code, details)


def from_rpc_error(err: grpc.RpcError) -> HardnegError:
    """Converts the exception grpcio raises for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")
