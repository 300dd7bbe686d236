"""Progress lines a person can read: step, epoch, loss, rate, train top-1 and ETA; and a progress bar
for the commands that go over a dataset once (evaluate, infer)."""

import collections
import sys
import time

RATE_WINDOW = 20  # steps over which images/s and the ETA are measured


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """The run's step count, and the rate and ETA of this attempt (a start or a resume): over its
    last RATE_WINDOW steps, leaving out its first step (which pays for warm-up) once there are
    others. The step times are the trainer's loop times (cluster/telemetry/step.py)."""

    def __init__(self, total_steps: int, done: int = 0, window: int = RATE_WINDOW, clock=time.perf_counter):
        """`done`: steps a resumed run had already taken; rate and ETA count this attempt's only."""
        self.total_steps, self.steps, self.clock = total_steps, done, clock
        self.attempt_steps = 0
        self.started = clock()
        self._first: tuple[float, int] | None = None  # (seconds, images) of the attempt's first step
        self._window: collections.deque = collections.deque(maxlen=window)  # (seconds, images)
        self.warm_seconds, self.warm_images = 0.0, 0  # every step after the first
        self.scored = self.hits = 0  # since the last line: images with top-1 hits reported, and the hits

    def update(self, images: int, seconds: float, top1: float | None = None) -> None:
        """One step of `images` that took `seconds`; `top1`: how many of them the network ranked
        first correctly."""
        self.steps += 1
        self.attempt_steps += 1
        if top1 is not None:
            self.scored, self.hits = self.scored + images, self.hits + top1
        if self._first is None:
            self._first = (seconds, images)
            return
        self._window.append((seconds, images))
        self.warm_seconds += seconds
        self.warm_images += images

    def _recent(self) -> tuple[float, int, int]:
        """(seconds, images, steps) the rate is measured over."""
        if self._window:
            return sum(s for s, _ in self._window), sum(n for _, n in self._window), len(self._window)
        if self._first is not None:
            return self._first[0], self._first[1], 1
        return 0.0, 0, 0

    @property
    def images_per_second(self) -> float:
        """Over the recent steps."""
        seconds, images, _ = self._recent()
        return images / seconds if seconds > 0 else 0.0

    @property
    def mean_images_per_second(self) -> float:
        """Over every step of this attempt but the first (the first alone, if it is the only one)."""
        if self.warm_seconds > 0:
            return self.warm_images / self.warm_seconds
        return self.images_per_second

    def eta(self) -> float:
        seconds, _, steps = self._recent()
        return seconds / steps * (self.total_steps - self.steps) if steps else 0.0

    def elapsed(self) -> float:
        """Wall-clock seconds since this attempt started."""
        return self.clock() - self.started

    def line(self, epoch: int, epochs: int, loss: float, lr: float, extra: str = "") -> str:
        """The line; its train top-1 is over the steps since the previous line."""
        top1 = f" | train top-1 {100 * self.hits / self.scored:.1f}%" if self.scored else ""
        self.scored = self.hits = 0
        return (f"step {self.steps}/{self.total_steps} | epoch {epoch + 1}/{epochs} | loss {loss:.4f} | "
                f"lr {lr:.3g} | {self.images_per_second:.1f} img/s{top1}{extra} | ETA {format_duration(self.eta())}")


class ProgressBar:
    """A progress bar on a stream (stderr): redrawn in place at most 4×/s on a terminal, else one
    line every `log_every_s` seconds (logs, `ray job logs`), and always once at the end."""

    WIDTH = 30

    def __init__(self, label: str, total: int, unit: str, stream=None, log_every_s: float = 10.0,
                 clock=time.monotonic):
        self.label, self.total, self.unit, self.clock = label, max(total, 0), unit, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.25 if self.tty else log_every_s
        self.started = self.last = clock()
        self.done, self.extra = 0, ""

    def update(self, done: int, extra: str = "", final: bool = False) -> None:
        """`done` of `total` units, and what else to show (e.g. a rate or a running top-1)."""
        self.done, self.extra = done, extra
        now = self.clock()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        share = min(done / self.total, 1.0) if self.total else 1.0
        filled = int(round(share * self.WIDTH))
        elapsed = now - self.started
        eta = format_duration(elapsed / share - elapsed) if 0 < share < 1 else "0s"
        line = (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} {self.unit} "
                f"({100 * share:.0f}%){' | ' + extra if extra else ''} | {format_duration(elapsed)}, ETA {eta}")
        self.stream.write(("\r" + line + "\x1b[K" if self.tty else line) + ("\n" if final or not self.tty else ""))
        self.stream.flush()

    def close(self, extra: str | None = None) -> None:
        """The final line."""
        self.update(self.done, self.extra if extra is None else extra, final=True)
