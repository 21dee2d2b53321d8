"""Request throughput of the REST fronts and gRPC, as ratios against a bare aiohttp baseline."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from bench.load import Load, Result, run_load
from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.config import Config
from service.server import start_service


async def _baseline() -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{bound_port(runner)}/"


async def main(requests: int, envoy: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        service = await start_service(Config(data_dir=Path(tmp)), port=0)
        front = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{service.port}"), port=0)
        base, base_url = await _baseline()
        await service.store.create_account("bench", 10**12)
        key = keys.new_key()
        await service.store.create_key("bench", keys.hash_key(key), "p", "", None)
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        fronts = {"aiohttp": f"http://127.0.0.1:{bound_port(front)}"}
        envoy_cm = None
        if envoy:
            from tests.envoy_harness import envoy_front

            envoy_cm = envoy_front(service.port)
            fronts["envoy"] = await envoy_cm.__aenter__()
        generate = json.dumps(
            {"model": "local", "prompt": "bench", "size": "256x256", "response_format": "b64_json"}
        ).encode()
        rows: list[tuple[str, Result, float]] = []

        async def measure(name: str, load: Load) -> None:
            # CPU of this process (service + aiohttp front), not of the load generator.
            cpu = time.process_time()
            result = await run_load(load)
            rows.append((name, result, (time.process_time() - cpu) / max(result.done, 1)))

        try:
            await measure(
                "baseline: bare aiohttp JSON handler", Load("GET", base_url, {}, requests=requests)
            )
            for name, url in fronts.items():
                await measure(
                    f"{name}: GET /v1/models",
                    Load("GET", f"{url}/v1/models", auth, requests=requests),
                )
                await measure(
                    f"{name}: POST generations 256x256 b64",
                    Load(
                        "POST",
                        f"{url}/v1/images/generations",
                        auth,
                        generate,
                        requests=requests // 4,
                    ),
                )
        finally:
            if envoy_cm is not None:
                await envoy_cm.__aexit__(None, None, None)
            await base.cleanup()
            await front.cleanup()
            await service.stop()
    baseline = rows[0][1].rps
    print(f"{'case':42} {'req/s':>9} {'ratio':>7} {'cpu ms/req':>10} {'failed':>7}")
    for name, result, cpu in rows:
        print(
            f"{name:42} {result.rps:9.0f} {result.rps / baseline:7.2f} {cpu * 1000:10.2f} "
            f"{result.failed:7d}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--envoy", action="store_true", help="also measure the Envoy front")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.envoy))
