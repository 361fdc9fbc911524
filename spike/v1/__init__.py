"""Generated gRPC/protobuf stubs for the spike.v1 API (see protos/). Do not edit."""
