"""Models served by an upstream inference server: their logits come from its infer call, and calibserve
calibrates them in the same round trip (the use cases behind every protocol's inference on such a model).

An inference request's inputs go upstream unchanged (JSON or binary, any datatype and shape the upstream
takes); what comes back is checked before a probability is computed from it: the logits output must be
there, of a float type, with the model's class count and finite values, else :class:`UpstreamFailed` (502)
names the model. Every other output the client asked for passes through as the upstream wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import inference_protocol as wire
from service.core.validation import same_class_count
from service.errors import InvalidInput, UpstreamFailed
from service.serving.state import ActiveCalibrator, ModelInfo
from service.upstream import UpstreamClient, Upstreams, UpstreamSpec

# The outputs calibserve adds to an upstream model's: never asked of the upstream.
OWN_OUTPUTS = ("probabilities", "predicted_class", "prediction_sets")


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """An upstream's inference answer, read: its document, its outputs by name (entry, binary bytes or
    None), and the logits taken from output ``logits_output``."""

    document: dict[str, Any]
    outputs: dict[str, tuple[dict[str, Any], bytes | None]]
    logits_output: str
    logits: np.ndarray
    datatype: str


@dataclass(frozen=True, slots=True)
class PassedThrough:
    """An upstream answer returned as it came (a model of the default upstream with no calibrator yet)."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def logits_output(spec: UpstreamSpec, names: Sequence[str]) -> str:
    """The output that holds the logits: ``spec.output``, else the only output, else the one named
    ``logits``."""
    if spec.output is not None:
        return spec.output
    if len(names) == 1:
        return names[0]
    if "logits" in names:
        return "logits"
    raise UpstreamFailed(
        f"upstream model {spec.model!r} has outputs {list(names)}; say which holds the logits "
        "(upstream.output of the model)"
    )


def read_logits(
    info: ModelInfo, spec: UpstreamSpec, entry: Mapping[str, Any], chunk: bytes | None, expected: int | None
) -> tuple[np.ndarray, str]:
    """The logits ``[N, K]`` of an output entry, with its datatype; UpstreamFailed naming the model when
    they are not float logits of ``expected`` classes, finite."""
    where = f"upstream model {spec.model!r} (model {info.name!r})"
    datatype = entry.get("datatype")
    if datatype not in wire.FLOAT_TYPES:
        raise UpstreamFailed(
            f"{where}: logits output {entry.get('name')!r} is {datatype!r}, not FP32/FP64/FP16"
        )
    try:
        logits = wire.tensor_array(entry, chunk, f"{where} output {entry.get('name')!r}")
    except InvalidInput as exc:
        raise UpstreamFailed(str(exc)) from None
    if logits.ndim == 1:
        logits = logits.reshape(-1, 1)  # one logit per row: a binary model
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise UpstreamFailed(f"{where}: logits must be [N, K], got shape {list(logits.shape)}")
    if expected is not None and not same_class_count(logits.shape[1], expected):
        raise UpstreamFailed(
            f"{where}: answered {logits.shape[1]} logit columns; the model has {expected} classes"
        )
    if not np.isfinite(logits).all():
        raise UpstreamFailed(f"{where}: answered logits that are NaN or infinite")
    return logits, datatype


def expected_classes(info: ModelInfo, entry: ActiveCalibrator) -> int | None:
    if info.num_classes is not None:
        return info.num_classes
    return getattr(entry.calibrator, "num_classes_", None)


class UpstreamModels:
    """Inference, logits and metadata of upstream models, over this worker's :class:`Upstreams`."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    def client(self, info: ModelInfo) -> tuple[UpstreamClient, UpstreamSpec]:
        spec = info.upstream
        if spec is None:
            raise InvalidInput(f"model {info.name!r} is not served by an upstream inference server")
        return self.upstreams.client(spec), spec

    async def forward(self, info: ModelInfo, body: bytes, headers: Mapping[str, str]) -> PassedThrough:
        """The request as it came, answered as the upstream answered."""
        client, spec = self.client(info)
        response = await client.forward(spec, body, headers)
        kept = {
            key.lower(): response.headers[key]
            for key in ("content-type", wire.HEADER_LENGTH)
            if key in response.headers
        }
        return PassedThrough(response.content, kept)

    async def infer(
        self, info: ModelInfo, entry: ActiveCalibrator, document: Mapping[str, Any], binary: bytes
    ) -> UpstreamAnswer:
        """One inference request of a client: its inputs upstream unchanged, its outputs less calibserve's
        own, plus the logits output (binary: exact and cheap); the answer read and checked."""
        client, spec = self.client(info)
        forwarded = dict(document)
        parameters = document.get("parameters")
        if (
            isinstance(parameters, Mapping) and "seed" in parameters
        ):  # calibserve's (randomised sets), not theirs
            forwarded["parameters"] = {key: value for key, value in parameters.items() if key != "seed"}
        requested = document.get("outputs")
        logits_name = spec.output
        if requested is not None:
            if not isinstance(requested, list) or not all(isinstance(item, Mapping) for item in requested):
                raise InvalidInput("outputs must be a list of {name, parameters} objects")
            outputs = [item for item in requested if item.get("name") not in OWN_OUTPUTS]
            if logits_name is None:
                metadata = await client.model_metadata(spec)
                logits_name = logits_output(spec, [str(o.get("name")) for o in metadata.get("outputs", [])])
            if all(item.get("name") != logits_name for item in outputs):
                outputs.append({"name": logits_name, "parameters": {"binary_data": True}})
            forwarded["outputs"] = outputs
        answer, answer_binary = await client.infer(spec, forwarded, [binary] if binary else [])
        return self.read_answer(info, spec, entry, answer, answer_binary, logits_name)

    def read_answer(
        self,
        info: ModelInfo,
        spec: UpstreamSpec,
        entry: ActiveCalibrator,
        document: dict[str, Any],
        binary: bytes,
        logits_name: str | None,
    ) -> UpstreamAnswer:
        entries = document.get("outputs")
        if not isinstance(entries, list):
            raise UpstreamFailed(f"upstream model {spec.model!r} answered no outputs list")
        try:
            chunks = wire.tensor_chunks(entries, binary, f"outputs of upstream model {spec.model!r}")
        except InvalidInput as exc:
            raise UpstreamFailed(str(exc)) from None
        outputs = {str(item.get("name")): (item, chunk) for item, chunk in zip(entries, chunks, strict=True)}
        name = logits_name or logits_output(spec, list(outputs))
        if name not in outputs:
            raise UpstreamFailed(f"upstream model {spec.model!r} answered no output {name!r} (its logits)")
        logits, datatype = read_logits(info, spec, *outputs[name], expected_classes(info, entry))
        return UpstreamAnswer(document, outputs, name, logits, datatype)

    async def logits(
        self, info: ModelInfo, entry: ActiveCalibrator, inputs: np.ndarray | Sequence[tuple[str, np.ndarray]]
    ) -> np.ndarray:
        """The upstream's logits for ``inputs``: one array (the model's single input, converted to its
        datatype) or named arrays (one per input), sent in batches of at most the upstream's
        ``max_batch_size`` (Triton) and ``CALIBSERVE_UPSTREAM_BATCH_SIZE`` rows."""
        client, spec = self.client(info)
        metadata = await client.model_metadata(spec)
        declared = [item for item in metadata.get("inputs", []) if isinstance(item, Mapping)]
        if isinstance(inputs, np.ndarray):
            if len(declared) != 1:
                raise InvalidInput(
                    f"upstream model {spec.model!r} of {info.name!r} takes {len(declared)} inputs "
                    f"({[item.get('name') for item in declared]}); send them by name (upstream_inputs, or the "
                    "Open Inference Protocol)",
                    field="inputs",
                )
            dtype = wire.NUMPY_TYPES.get(declared[0].get("datatype"))
            if dtype is None:
                raise InvalidInput(
                    f"upstream model {spec.model!r} input {declared[0].get('name')!r} is "
                    f"{declared[0].get('datatype')}, which calibserve cannot send",
                    field="inputs",
                )
            if inputs.dtype.kind not in "biuf":
                raise InvalidInput("inputs must be an array of numbers", field="inputs")
            with np.errstate(over="ignore", invalid="ignore"):
                named = [(str(declared[0].get("name")), inputs.astype(dtype, copy=False))]
        else:
            named = [(name, np.asarray(array)) for name, array in inputs]
        if not named:
            raise InvalidInput("no inputs to send upstream", field="upstream_inputs")
        rows = {array.shape[0] if array.ndim else -1 for _, array in named}
        if len(rows) != 1 or -1 in rows:
            raise InvalidInput(
                "every upstream input must be a batch with the same number of rows", field="upstream_inputs"
            )
        n = rows.pop()
        batch = self.upstreams.batch_size
        limit = await client.max_batch_size(spec)
        if limit is not None:
            batch = min(batch, limit)
        logits_name = spec.output or logits_output(
            spec, [str(item.get("name")) for item in metadata.get("outputs", []) if isinstance(item, Mapping)]
        )
        parts = []
        for start in range(0, max(n, 1), batch):
            entries, chunks = [], []
            for name, array in named:
                tensor, data = wire.binary_entry(name, array[start : start + batch])
                entries.append(tensor)
                chunks.append(data)
            document = {
                "inputs": entries,
                "outputs": [{"name": logits_name, "parameters": {"binary_data": True}}],
            }
            answer, binary = await client.infer(spec, document, chunks)
            parts.append(self.read_answer(info, spec, entry, answer, binary, logits_name).logits)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def metadata(self, info: ModelInfo) -> dict[str, Any]:
        client, spec = self.client(info)
        return await client.model_metadata(spec)

    async def not_ready(self, info: ModelInfo) -> str | None:
        client, spec = self.client(info)
        return await client.not_ready(spec)
