"""Generated gRPC stubs for simserve.v1 (scripts/gen-proto.sh); do not edit."""
