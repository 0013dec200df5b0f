"""The Open Inference Protocol over gRPC: a ``grpc.aio`` server in every worker (``CALIBSERVE_GRPC_PORT``)
answering Triton's and KServe's ``inference.GRPCInferenceService``, a thin codec over the same data plane
calls as the HTTP routes (:mod:`service.serving.open_inference`).

``server.py`` starts and stops it with the app; ``servicer.py`` decodes each RPC, calls the data plane and
encodes the answer; ``status.py`` maps domain errors to gRPC status codes, in one place. Nothing here is
imported unless a gRPC port is configured: ``grpcio`` and the stubs are the ``grpc`` extra.
"""
