"""The protocol-neutral serving layer: what one worker holds (:mod:`.state`) and the use cases every
protocol calls (:mod:`.dataplane`), in numpy arrays and domain objects, raising domain errors only.

Codecs (``service/api`` for HTTP v1 and the Open Inference Protocol, the CLI's local mode) decode a request,
call the data plane and encode its answer; none of them does work of its own.
"""
