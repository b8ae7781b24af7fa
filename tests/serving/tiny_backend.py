"""A tiny keep-alive HTTP/1.1 backend for the router's mirror tests (no model):

    python tests/serving/tiny_backend.py PORT NAME [--delay S] [--status N]

Answers every POST with ``{"predictions": [<request body length>], "by": NAME}`` after
``delay`` seconds with ``status``; GET /ping answers 200. Counts what it served at GET /count.
"""

import argparse
import asyncio
import json


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    served = {"count": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                status = 200
                if path == "/ping":
                    payload = b"{}"
                elif path == "/count":
                    payload = json.dumps(served).encode()
                else:
                    served["count"] += 1
                    if args.delay:
                        await asyncio.sleep(args.delay)
                    status = args.status
                    payload = json.dumps({"predictions": [len(body)], "by": args.name}).encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                    % (status, len(payload))
                    + payload
                )
                await writer.drain()
                if method == "":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
