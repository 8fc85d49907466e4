"""The helper-thread wake-up (`dtask.wakeup`): pollable, counting, never blocking."""

from __future__ import annotations

import select
import threading

from dtask.wakeup import Wakeup


def test_notifies_from_other_threads_are_counted_and_make_the_fd_readable() -> None:
    wake = Wakeup()
    poller = select.poll()
    poller.register(wake.fd, select.POLLIN)
    try:
        assert poller.poll(0) == [] and wake.take() == 0
        threads = [threading.Thread(target=lambda: [wake.notify() for _ in range(100)])
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert poller.poll(1000) == [(wake.fd, select.POLLIN)]
        assert wake.take() == 400  # one count per notify: how many jobs finished
        assert poller.poll(0) == [] and wake.take() == 0  # taken: quiet again
    finally:
        wake.close()
    assert wake.fd == -1
    wake.close()  # twice is harmless
