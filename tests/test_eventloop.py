"""The actor's event loop: epoll waited on with select() (microsecond
timeouts) must still wake at once for a descriptor's event, fire its timers,
and sleep, not spin, while it waits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from flumeq._eventloop import new_event_loop


def test_a_descriptor_event_wakes_the_loop_before_a_distant_timer() -> None:
    loop = new_event_loop()
    reader, writer = socket.socketpair()
    try:

        async def main() -> tuple[bytes, float]:
            got: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(reader.fileno(), lambda: got.set_result(reader.recv(16)))
            loop.call_later(30.0, lambda: None)  # the select() waits up to 30 s
            threading.Timer(0.05, writer.send, (b"ping",)).start()
            started = time.monotonic()
            data = await asyncio.wait_for(got, 5.0)
            return data, time.monotonic() - started

        data, waited = loop.run_until_complete(main())
        assert data == b"ping"
        assert waited < 2.0, waited
    finally:
        loop.close()
        reader.close()
        writer.close()


def test_timers_fire_and_a_waiting_loop_does_not_spin() -> None:
    loop = new_event_loop()
    try:

        async def main() -> list[int]:
            fired: list[int] = []
            for n in range(20):
                loop.call_later(0.001 * n, fired.append, n)
            await asyncio.sleep(0.4)
            return fired

        cpu = time.process_time()
        fired = loop.run_until_complete(main())
        used = time.process_time() - cpu
        assert fired == list(range(20))
        assert used < 0.2, f"the loop burnt {used:.3f} s of CPU in 0.4 s of waiting"
    finally:
        loop.close()
