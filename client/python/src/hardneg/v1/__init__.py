"""Generated gRPC stubs of ``proto/hardneg/v1/hardneg.proto`` (``hardneg_pb2``,
``hardneg_pb2_grpc``), written here by the package build."""
