"""imagegate: the generated gRPC contract (package imagegate.v1)."""
