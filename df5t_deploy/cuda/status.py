"""The one status check for every cuda-python call: driver (CUresult), runtime (cudaError_t)
and NVRTC (nvrtcResult) calls all return (status, *values), and success is 0 in each enum."""

from __future__ import annotations

from typing import Any


def checked(result: Any, what: str, error: type[Exception]) -> Any:
    """The values of a cuda-python call's result (one value bare, several as a tuple, none
    as None); ``error`` naming ``what`` and the status unless the call succeeded."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise error(f"{what} failed: {getattr(status, 'name', status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
