# imagegate in one container: the gRPC ImageService (50051) and the aiohttp REST
# front (8080), with SQLite and the image files under /data.
# docker-compose.yml runs Envoy next to it (REST on 10000) from envoy.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY service ./service
COPY gateway ./gateway
COPY settings ./settings
RUN pip install '.[postgres,redis,s3]' && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /data imagegate \
    && mkdir -p /data && chown imagegate /data
USER imagegate
WORKDIR /data

# Inside a container the servers must listen on every interface: published
# ports arrive on the container's own address, never on its 127.0.0.1.
ENV IMAGEGATE_HOST=0.0.0.0 \
    IMAGEGATE_DATA_DIR=/data
EXPOSE 50051 8080
VOLUME ["/data"]

CMD ["imagegate", "serve", "--data-dir", "/data"]
