"""Why a job stopped, classified: user errors fail at once, the rest may be retried."""


class JobError(Exception):
    """A failure the user must fix (bad dataset, missing weights): retrying cannot help."""

    retryable = False

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class StopJob(Exception):
    """Raised between training steps when the job must stop: cancelled, lease lost or shutdown."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
