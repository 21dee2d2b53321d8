"""imagegate's embedded REST front: transcodes OpenAI-shaped JSON to ImageService gRPC."""
