"""The base of the errors that carry the HTTP status a client gets for them."""


class StatusError(Exception):
    """An error reported to the client as ``status_code`` with ``detail``."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail

    def __reduce__(self) -> tuple[type["StatusError"], tuple[int, str]]:
        # Raised in worker processes and pickled back: the default would call cls(detail).
        return type(self), (self.status_code, self.detail)
