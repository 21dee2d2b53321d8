"""A gRPC ImageService that streams one event and then hangs, for a test to kill -9.

Run as `python -m tests.fakes.vanishing_service`: it prints its port, then serves.
The test kills the process mid-stream, as a crash would: no status, no error event.
"""

from __future__ import annotations

import asyncio

import grpc
from imagegate.v1 import images_pb2, images_pb2_grpc


class Vanishing(images_pb2_grpc.ImageServiceServicer):
    async def StreamImages(
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.write(images_pb2.ImageEvent(type="image_generation.partial_image"))
        print("sent", flush=True)
        await asyncio.Event().wait()


async def main() -> None:
    server = grpc.aio.server()
    images_pb2_grpc.add_ImageServiceServicer_to_server(Vanishing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
