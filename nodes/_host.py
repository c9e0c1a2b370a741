"""The ComfyUI host of the job layer (``jobs.Host``): the node's progress bar and ComfyUI's Cancel."""
import logging

import comfy.model_management
import comfy.utils

from ..jobs import Host

log = logging.getLogger("erasekit")


class ComfyHost(Host):
    """Progress goes to the running node's bar; Cancel raises ComfyUI's own interruption exception."""

    def __init__(self):
        self._bar = None

    def progress(self, done, total, unit="items"):
        if total is None:
            return
        if self._bar is None or self._bar.total != total:
            self._bar = comfy.utils.ProgressBar(total)
        self._bar.update_absolute(done, total)

    def check_interrupt(self):
        comfy.model_management.throw_exception_if_processing_interrupted()

    def log(self, message):
        log.info(message)


def fingerprint(compute):
    """``compute()`` for a node's ``fingerprint_inputs``: ComfyUI runs the node again when the value changes.

    A failure (a path that does not exist yet) gives NaN, which never equals itself: the node runs again and its
    ``execute`` says what is wrong."""
    try:
        return compute()
    except Exception:
        return float("nan")
