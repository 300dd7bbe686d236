"""Progress lines a person can read: step, epoch, loss, rate, train top-1 and ETA."""

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Rate and ETA over the steps done so far in this run (the first step, which pays for warm-up,
    is left out of the rate once there are others)."""

    def __init__(self, total_steps: int, clock=time.perf_counter, done: int = 0):
        """`done`: steps a resumed run had already taken; rate and ETA count this run's only."""
        self.total_steps, self.clock = total_steps, clock
        self.steps = self.first_step = done
        self.images = 0
        self.started = clock()
        self.warm_start: float | None = None
        self.warm_images = 0
        self.scored = self.hits = 0  # since the last line: images with top-1 hits reported, and the hits

    def update(self, images: int, top1: float | None = None) -> None:
        """One step of `images`; `top1`: how many of them the network ranked first correctly."""
        self.steps += 1
        self.images += images
        if top1 is not None:
            self.scored, self.hits = self.scored + images, self.hits + top1
        if self.warm_start is None:
            self.warm_start = self.clock()
        else:
            self.warm_images += images

    @property
    def images_per_second(self) -> float:
        now = self.clock()
        if self.warm_images and now > self.warm_start:
            return self.warm_images / (now - self.warm_start)
        return self.images / max(now - self.started, 1e-9)

    @property
    def seconds_per_step(self) -> float:
        now = self.clock()
        run = self.steps - self.first_step  # steps of this run
        if run > 1:
            return (now - self.warm_start) / (run - 1)
        return (now - self.started) / max(run, 1)

    def eta(self) -> float:
        return self.seconds_per_step * (self.total_steps - self.steps)

    def line(self, epoch: int, epochs: int, loss: float, lr: float, extra: str = "") -> str:
        """The line; its train top-1 is over the steps since the previous line."""
        top1 = f" | train top-1 {100 * self.hits / self.scored:.1f}%" if self.scored else ""
        self.scored = self.hits = 0
        return (f"step {self.steps}/{self.total_steps} | epoch {epoch + 1}/{epochs} | loss {loss:.4f} | "
                f"lr {lr:.3g} | {self.images_per_second:.1f} img/s{top1}{extra} | ETA {format_duration(self.eta())}")
