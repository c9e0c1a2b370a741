"""Process isolation for video mining: a damaged file that crashes or hangs the decoder costs only its video.

Each worker is a fresh interpreter started from a script path, ``python dataset_tools/_video_worker.py FD``,
which imports this pack from its own location. Nothing in the calling interpreter is touched: no ``sys.path``
entry, no ``sys.modules`` entry, no ``__main__`` swap (inside ComfyUI the caller is the server). It works the
same whether the pack is the pip-installed ``erasekit`` or a ComfyUI ``custom_nodes/<any name>`` folder.

Wire protocol, private to this module: over one duplex pipe per worker the parent sends ``("init", pairing
settings, segmenter spec)``, then one task's fields per task and ``None`` to stop; the child answers with
``(event type name, event fields)`` for every event of ``video_mining.mine_task``. Only builtins and numpy arrays
cross the pipe, so neither side needs to import the other's modules by name; ``run`` hands the caller typed
events again.

Object masks can come from the parent instead of a segmenter loaded in each child (``segment``: on Ray, a
GPU actor pool serves every mining process): the child then asks ``("segment", image, zone)`` and waits for the
mask (or ``("error", message)``), so the mining algorithm is the same either way.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, fields, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from .video_mining import EVENT_TYPES, PairingConfig, PairMined, VideoFinished, VideoReport, VideoTask, mine_task

KILLED = "killed (likely out of memory)"
CRASHED = "crashed the decoder"
HUNG = "decoder hung"
SEGMENT = "segment"  # a child's request for an object mask (not an event)

WORKER_SCRIPT = Path(__file__).with_name("_video_worker.py")
_EVENTS_BY_NAME = {cls.__name__: cls for cls in EVENT_TYPES}


def to_wire(event):
    """A typed event as (type name, fields of builtins and arrays)."""
    values = {f.name: getattr(event, f.name) for f in fields(event)}
    if isinstance(event, VideoFinished):
        values["report"] = event.report.as_dict()
    return type(event).__name__, values


def from_wire(message):
    """The typed event of a ``to_wire`` message."""
    name, values = message
    if name == VideoFinished.__name__:
        values = {**values, "report": VideoReport(**values["report"])}
    return _EVENTS_BY_NAME[name](**values)


class _Worker:
    """One child process, its end of the pipe and the task it is mining (None when idle)."""

    def __init__(self, process, connection):
        self.process, self.connection = process, connection
        self.task, self.since, self.mined = None, 0.0, 0


class VideoWorkerPool:
    """Mine video tasks in ``workers`` isolated child processes; a child that dies fails only its current video.

    ``run(tasks)`` (a list of ``VideoTask``) yields typed events as they arrive: ``VideoProgress``, ``PairMined``
    and one ``VideoFinished`` per task. A child that dies is replaced. When it crashed while OpenCV decoded (a
    signal such as SIGSEGV or SIGABRT, a non-zero exit), its task is tried once more with PyAV; when that crashes
    too, or the child was killed (SIGKILL: most often the kernel's out-of-memory killer) or stayed silent for
    ``timeout`` seconds (hung decoder), the task ends with a ``VideoFinished`` of status "crashed" saying which,
    with the pairs it had sent. Each child has its own pipe, so a child killed mid-message cannot corrupt
    another's messages.
    """

    def __init__(self, config=PairingConfig(), workers=1, segmenter_spec=None, timeout=600.0, segment=None,
                 segment_name="segmenter"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config_dict = asdict(config)
        self.workers = workers
        # ``segment(image, zone)`` → mask or None, answered here for every child (``segment_name`` is its
        # mask_source); else each child loads the segmenter of ``segmenter_spec`` itself
        self.segment = segment
        self.segmenter_spec = {"remote": segment_name} if segment is not None else segmenter_spec
        self.timeout = timeout
        self._workers = []

    def _spawn(self):
        parent_end, child_end = multiprocessing.Pipe()
        process = subprocess.Popen([sys.executable, str(WORKER_SCRIPT), str(child_end.fileno())],
                                   pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL)
        child_end.close()
        worker = _Worker(process, parent_end)
        try:
            parent_end.send(("init", self.config_dict, self.segmenter_spec))
        except OSError:
            pass  # the child died at start-up: the first task reports it
        return worker

    def start(self):
        while len(self._workers) < self.workers:
            self._workers.append(self._spawn())
        return self

    def close(self):
        """Stop every child: idle ones are told to stop, busy ones (the run was interrupted) are killed."""
        for worker in self._workers:
            try:
                if worker.task is None:
                    worker.connection.send(None)
                else:
                    worker.process.kill()
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.connection.close()
        self._workers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _crashed(self, index, hung):
        """Kill and replace worker ``index``; (the ``VideoFinished`` of the task it was mining, or None when the
        task is tried again with PyAV, that retry)."""
        worker = self._workers[index]
        if worker.process.poll() is None:
            worker.process.kill()
        code = worker.process.wait()
        worker.connection.close()
        task, mined = worker.task, worker.mined
        self._workers[index] = self._spawn()
        name = Path(task.path).name
        if hung:
            problem = HUNG
            reason = f"no progress for {self.timeout:.0f} s while decoding {name} (decoder hung); its process was killed"
        elif code == -signal.SIGKILL:
            problem = KILLED
            reason = (f"the mining process of {name} was {KILLED} (SIGKILL, exit code -9); mine it with fewer "
                      "--workers, or a smaller --bank-size and --max-pending")
        else:
            problem = CRASHED
            what = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
                else f"exit code {code}"
            decoder = "OpenCV" if task.decoder == "opencv" else "PyAV"
            reason = f"{decoder}'s decoder crashed on {name} ({what}): its process died"
            if task.decoder == "opencv":
                if importlib.util.find_spec("av") is not None:
                    return None, replace(task, decoder="pyav", fallback=reason)
                reason += "; the PyAV fallback decoder would try it: pip install av"
        if task.fallback:
            reason = f"{task.fallback}; then {reason}"
        report = VideoReport(video=str(task.path), status="crashed", reason=reason, problem=problem, pairs=mined,
                             video_id=task.video_id, decoder=task.decoder, fallback=task.fallback)
        return VideoFinished(task.job, report), None

    def run(self, tasks):
        self.start()
        waiting = deque(tasks)
        while True:
            for worker in self._workers:
                if worker.task is None and waiting:
                    worker.task, worker.since, worker.mined = waiting.popleft(), time.monotonic(), 0
                    try:
                        worker.connection.send(asdict(worker.task))
                    except OSError:
                        pass  # a dead child: the wait below sees its pipe close
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                return
            ready = wait([w.connection for w in busy], timeout=1.0)
            for index, worker in enumerate(self._workers):
                if worker.task is None:
                    continue
                if worker.connection in ready:
                    try:
                        message = worker.connection.recv()
                        if message[0] == SEGMENT:
                            worker.since = time.monotonic()
                            worker.connection.send(self._segment(*message[1:]))
                            continue
                        event = from_wire(message)
                    except (EOFError, OSError):
                        finished, retry = self._crashed(index, hung=False)
                    else:
                        worker.since = time.monotonic()
                        if isinstance(event, PairMined):
                            worker.mined += 1
                        elif isinstance(event, VideoFinished):
                            worker.task = None
                        yield event
                        continue
                elif time.monotonic() - worker.since > self.timeout:
                    finished, retry = self._crashed(index, hung=True)
                else:
                    continue
                if retry is not None:
                    waiting.appendleft(retry)
                else:
                    yield finished


    def _segment(self, image, zone):
        """The answer to a child's segmentation request: ("mask", mask or None) or ("error", why)."""
        try:
            return "mask", self.segment(image, zone)
        except Exception as error:  # the child's video ends with this reason
            return "error", f"{type(error).__name__}: {error}"


class PipeSegmenter:
    """A child's segmenter whose masks the parent computes (``VideoWorkerPool(segment=...)``)."""

    def __init__(self, connection, name):
        self.connection, self.name = connection, name

    def __call__(self, image, zone=None):
        self.connection.send((SEGMENT, image, zone))
        kind, value = self.connection.recv()
        if kind == "error":
            raise RuntimeError(f"the segmenter failed: {value}")
        return value


def serve(fd):
    """The child's side: mine the tasks the parent sends over the pipe ``fd`` until it says stop (or closes)."""
    import cv2

    cv2.setNumThreads(1)  # one video per process: parallelism comes from the number of workers
    connection = Connection(fd)
    _, config_dict, segmenter_spec = connection.recv()
    config = PairingConfig.from_dict(config_dict)
    segmenter, segmenter_error = None, None
    if segmenter_spec and "remote" in segmenter_spec:
        segmenter = PipeSegmenter(connection, segmenter_spec["remote"])
    elif segmenter_spec:
        try:
            from .segmenters import load_text_segmenter

            segmenter = load_text_segmenter(**segmenter_spec)
        except Exception as error:  # every task then says why, instead of a dead worker
            segmenter_error = f"the segmenter could not be loaded: {type(error).__name__}: {error}"

    def emit(event):
        connection.send(to_wire(event))

    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        task = VideoTask(**message)
        if segmenter_error:
            emit(VideoFinished(task.job, VideoReport(video=str(task.path), status="skipped", reason=segmenter_error)))
            continue
        mine_task(task, config, emit, segmenter)
