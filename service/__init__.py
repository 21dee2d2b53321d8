"""imagegate's ImageService: domain core, stores, providers and the grpc.aio server."""
