"""Video decoding for the dataset tools: open a file, stream its frames, find the videos of a folder.

Decoding is the fragile part of mining (a damaged file can abort OpenCV's decoder, taking its process down), so
it is kept here, apart from the mining algorithm (``video_mining.py``) and from the process isolation that
contains such crashes (``video_isolation.py``). Frames are BGR uint8 as OpenCV gives them.

Two decoders: OpenCV (``"opencv"``, the default and the faster) and PyAV (``"pyav"``, FFmpeg's own demuxers and
decoders through the ``av`` package), which reads files OpenCV cannot open or crashes on, e.g. uncompressed
AVI files stored bottom-up (bgslibrary's dataset/demo.avi aborts OpenCV 5's reader). Mining falls back to PyAV
for such a file (``video_mining.mine_task``, ``video_isolation.VideoWorkerPool``).
"""
from __future__ import annotations

import math
import queue
from fractions import Fraction
from pathlib import Path

import cv2

from ..jobs import MissingExtra, require

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
DECODERS = ("opencv", "pyav")
CANNOT_DECODE = "cannot be decoded"  # the problem of a file no decoder opens or gets a frame from


class VideoSkipped(Exception):
    """The clip cannot give pairs (unopenable, moving camera, ...); ``str(e)`` is the reason, ``problem`` a short
    phrase that groups such clips in a run summary."""

    def __init__(self, reason, problem="cannot be mined"):
        super().__init__(reason)
        self.problem = problem


class PyAVCapture:
    """The part of ``cv2.VideoCapture`` that ``iter_frames`` uses, decoded by PyAV (BGR uint8 frames).

    A decoding error mid-stream ends the stream, as OpenCV's ``read`` returning False does."""

    def __init__(self, path):
        av = require("av", "dataset", "the PyAV fallback decoder")
        self.container = av.open(str(path))
        if not self.container.streams.video:
            self.container.close()
            raise ValueError("no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self._frames = self.container.decode(self.stream)
        self._frame = None

    def properties(self):
        """(fps, frame count (0 when unknown), width, height) as the container declares them."""
        stream = self.stream
        rate = stream.average_rate or stream.guessed_rate or 0
        fps = float(rate) if rate else 0.0
        count = int(stream.frames or 0)
        if not count and stream.duration and stream.time_base and fps:
            count = int(round(float(stream.duration * Fraction(stream.time_base)) * fps))
        return fps, count, int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)

    def set(self, prop, value):
        """Only CAP_PROP_POS_FRAMES: decode and drop frames up to ``value`` (exact, not a keyframe seek)."""
        for _ in range(int(value)):
            if not self.grab():
                break
        return True

    def grab(self):
        try:
            self._frame = next(self._frames)
            return True
        except StopIteration:
            self._frame = None
            return False
        except Exception:  # av.error.* on damaged data: the stream ends here
            self._frame = None
            return False

    def retrieve(self):
        if self._frame is None:
            return False, None
        return True, self._frame.to_ndarray(format="bgr24")

    def read(self):
        return self.retrieve() if self.grab() else (False, None)

    def release(self):
        self.container.close()


def open_video(path, decoder="opencv"):
    """A capture of ``path`` (cv2.VideoCapture, or ``PyAVCapture`` for ``decoder="pyav"``) with its (fps, frame
    count, width, height), or VideoSkipped."""
    path = Path(path)
    if not path.exists():
        raise VideoSkipped(f"{path} does not exist", "missing")
    if not path.is_file():
        raise VideoSkipped(f"{path} is a folder, not a video file", "missing")
    if decoder == "pyav":
        try:
            capture = PyAVCapture(path)
        except MissingExtra as error:
            raise VideoSkipped(str(error), CANNOT_DECODE) from None
        except Exception as error:
            why = getattr(error, "strerror", None) or str(error)
            raise VideoSkipped(f"PyAV cannot open {path.name} either ({why})", CANNOT_DECODE) from None
        fps, count, width, height = capture.properties()
    elif decoder == "opencv":
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise VideoSkipped(f"OpenCV cannot open {path.name} (not a video, or no decoder for its codec)", CANNOT_DECODE)
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    else:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if not (fps > 0 and math.isfinite(fps)):
        fps = 25.0  # some containers do not say; the window is then measured in 25-fps frames
    return capture, float(fps), count, width, height


def iter_frames(path, start=0, stop=None, step=1, prefetch=0, include_skipped=False, prepare=None, decoded=None,
                decoder="opencv"):
    """Yield (index, BGR uint8 frame) for every ``step``-th frame in [start, stop); the others are only
    decoded (``grab``), not converted, and yielded as (index, None) if ``include_skipped``. The stream
    ends at the first frame the decoder cannot give.

    ``prefetch`` > 0 decodes in a thread up to that many frames ahead (OpenCV releases the GIL while
    decoding, so decoding overlaps the caller's analysis; memory stays bounded by the queue).
    ``prepare(frame)``, if given, runs in that thread too and the frame item becomes (frame, prepared).
    ``decoded``, a list, gets the index of the last frame decoded appended when the stream ends: where
    the decoder stopped, without passing every skipped frame through the queue. ``decoder``: see ``open_video``.
    """
    capture, _, _, _, _ = open_video(path, decoder)
    if start:
        capture.set(cv2.CAP_PROP_POS_FRAMES, start)

    def frames():
        index = start
        while stop is None or index < stop:
            if (index - start) % step:
                if not capture.grab():
                    break
                if include_skipped:
                    yield index, None
            else:
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                yield index, (frame if prepare is None else (frame, prepare(frame)))
            index += 1
        if decoded is not None:
            decoded.append(index - 1)

    if prefetch <= 0:
        try:
            yield from frames()
        finally:
            capture.release()
        return
    import threading

    buffer = queue.Queue(maxsize=prefetch)
    stopping = threading.Event()
    failure = []

    def decode():
        try:
            for item in frames():
                while not stopping.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stopping.is_set():
                    return
        except BaseException as error:  # handed to the consumer
            failure.append(error)
        finally:
            buffer.put(None)

    thread = threading.Thread(target=decode, name="erasekit-video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is None:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stopping.set()
        while thread.is_alive():
            try:
                buffer.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
        capture.release()


def read_frames(path, start=0, count=16, step=1, host=None, decoder="opencv"):
    """Up to ``count`` RGB frames from ``start``, every ``step``-th: (frames, declared fps, declared frame count).

    Raises ValueError naming the file when it cannot be opened or has no frame at or after ``start``."""
    try:
        capture, fps, total, _, _ = open_video(path, decoder)
    except VideoSkipped as error:
        raise ValueError(str(error)) from None
    capture.release()
    frames = []
    for _, frame in iter_frames(path, start, None, step, decoder=decoder):
        if host is not None:
            host.check_interrupt()
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if host is not None:
            host.progress(len(frames), count, "frames")
        if len(frames) >= count:
            break
    if not frames:
        raise ValueError(f"{path} has no decodable frame at or after frame {start} (it declares {total})")
    return frames, fps, total


def find_videos(inputs):
    """Video files named in ``inputs`` (files, folders searched recursively, lists of paths or URLs, parquet files of
    paths; local or fsspec URLs: ``sources.expand``), sorted within each folder, no duplicates."""
    from .sources import expand

    return expand(inputs, VIDEO_EXTENSIONS, "video input")
