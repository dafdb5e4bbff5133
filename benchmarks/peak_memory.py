"""Peak resident-set growth of the current process inside a `with` block (shared by the benchmarks).

Sampled every millisecond from /proc/self/statm: the process high-water mark (`ru_maxrss`) is often
already set by model construction, so it cannot show the smaller peak of one forward pass.
"""

from __future__ import annotations

import os
import threading
import time


class PeakRSS:
    def __init__(self, interval: float = 0.001):
        self.interval, self.page = interval, os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth_mib = (self.peak - self.baseline) / 2**20
