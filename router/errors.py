"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}} with a status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the API answers with `status` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def from_dict(cls, error: dict[str, Any]) -> APIError:
        """From the error a replica yields (replica/deployment.py: error_dict)."""
        return cls(
            error["status"],
            error["message"],
            param=error.get("param"),
            code=error.get("code"),
            retry_after=error.get("retry_after"),
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def model_not_found(model: str) -> APIError:
    # The same answer for an adapter that does not exist and one the tenant may not use.
    return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
