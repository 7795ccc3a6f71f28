"""Taking turns on the model, and batching the jobs that wait for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol


class Job(Protocol):
    """What the batcher needs of a job."""

    key: Any  # jobs with equal keys may run together
    done: bool

    @property
    def size(self) -> int:
        """Images the job makes."""


class Batcher:
    """Gives the model to one batch at a time. A caller waits its turn; whichever caller gets the model takes the
    oldest waiting job and, up to `max_jobs` jobs and `max_images` images, the later ones of the same shape, and
    runs them for everyone in it. So a batch forms only from jobs that would otherwise wait: no delay is added."""

    def __init__(self, max_jobs: int, max_images: int) -> None:
        self.max_jobs, self.max_images = max_jobs, max_images
        self._changed = threading.Condition()
        self._waiting: list[Job] = []
        self._runs: dict[int, Callable[[list[Job]], None]] = {}  # each waiting job's own way to run its batch
        self._busy = False

    def run(self, job: Job, execute: Callable[[list[Job]], None]) -> None:
        """Return once `job` is done, having run it (and perhaps others) or waited while another caller did.
        A batch runs with the `execute` its first job came with (jobs of one key share one), whichever caller
        takes the turn."""
        with self._changed:
            self._waiting.append(job)
            self._runs[id(job)] = execute
            while True:
                while self._busy and not job.done:
                    self._changed.wait()
                if job.done:
                    return
                self._busy = True
                batch = self._take()
                execute_batch = self._runs[id(batch[0])]
                for member in batch:
                    del self._runs[id(member)]
                self._changed.release()
                try:
                    execute_batch(batch)
                except BaseException:
                    with self._changed:
                        if job in self._waiting:  # it raised while running others' jobs: this caller leaves now
                            self._waiting.remove(job)
                            self._runs.pop(id(job), None)
                    raise
                finally:
                    self._changed.acquire()
                    for member in batch:
                        member.done = True
                    self._busy = False
                    self._changed.notify_all()

    def _take(self) -> list[Job]:
        first = self._waiting[0]
        batch, images = [first], first.size
        for other in self._waiting[1:]:
            if len(batch) == self.max_jobs:
                break
            if other.key == first.key and images + other.size <= self.max_images:
                batch.append(other)
                images += other.size
        for member in batch:
            self._waiting.remove(member)
        return batch
