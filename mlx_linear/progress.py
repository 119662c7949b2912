"""One-line progress for long work: count, rate, ETA and any fields the caller adds."""

import sys
import time


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Redraws one line on a terminal; elsewhere prints a line every `log_every` seconds."""

    def __init__(self, total, unit="tok", desc="", stream=None, log_every=30.0):
        self.total, self.unit, self.desc = total, unit, desc
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.log_every = log_every
        self.done = 0
        self.start = self.last = time.perf_counter()

    @property
    def rate(self):
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self, **fields):
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0
        parts = [self.desc, f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total:
            parts.append(f"ETA {format_seconds(eta)}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        return " | ".join(p for p in parts if p)

    def update(self, n, **fields):
        self.done += n
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r\033[K" + self.line(**fields))
            self.stream.flush()
        elif now - self.last >= self.log_every or (self.total and self.done >= self.total):
            self.stream.write(self.line(**fields) + "\n")
            self.stream.flush()
            self.last = now

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
