"""A TCP relay that delays every byte by a fixed time each way: WAN latency without tc netem.

``python delay_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS`` prints "ready" once
listening; stops on SIGTERM. Data is forwarded in arrival order, each chunk no earlier than
ONE_WAY_MS after it was read, so a round trip through the relay takes at least 2 x ONE_WAY_MS
while throughput stays that of the link. When one side closes, the other side is closed too.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(1 << 20):
                queue.put_nowait((time.monotonic() + delay, chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((time.monotonic() + delay, b""))

    async def write() -> None:
        try:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    await asyncio.gather(read(), write())


async def main() -> None:
    listen, target, one_way_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    delay = one_way_ms / 1000.0

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + 120
        while True:  # the target may not listen yet: hold the client's bytes until it does
            try:
                tr, tw = await asyncio.open_connection(thost, int(tport))
                break
            except OSError:
                if time.monotonic() > deadline:
                    cw.close()
                    return
                await asyncio.sleep(0.05)
        await asyncio.gather(pump(cr, tw, delay), pump(tr, cw, delay))

    server = await asyncio.start_server(handle, lhost, int(lport), reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
