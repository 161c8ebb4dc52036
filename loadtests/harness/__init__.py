"""The gRPC benchmark harness behind `loadtests/bench_grpc.py` (see its docstring)."""
