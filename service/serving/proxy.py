"""Models served by an upstream inference server: their logits come from its infer call, and calibserve
calibrates them in the same round trip (the use cases behind every protocol's inference on such a model).

An inference request's inputs go upstream as they came (JSON or binary, any datatype and shape the upstream
takes), or, where the request holds numeric tensors only and the model takes batches, as binary tensors in one
call with the requests of the same shape that queued meanwhile (:mod:`service.serving.upstream_batching`);
what comes back is checked before a probability is computed from it: the logits output must be
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
from service.serving.upstream_batching import Named, UpstreamBatcher
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

    body: bytes | memoryview
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
    _check_float(datatype, entry.get("name"), where)
    try:
        logits = wire.tensor_array(entry, chunk, f"{where} output {entry.get('name')!r}")
    except InvalidInput as exc:
        raise UpstreamFailed(str(exc)) from None
    return checked_logits(logits, where, expected), datatype


def _check_float(datatype: Any, name: Any, where: str) -> None:
    if datatype not in wire.FLOAT_TYPES:
        raise UpstreamFailed(f"{where}: logits output {name!r} is {datatype!r}, not FP32/FP64/FP16")


def checked_logits(logits: np.ndarray, where: str, expected: int | None) -> np.ndarray:
    """``logits`` as ``[N, K]``; UpstreamFailed naming ``where`` when they are not ``expected`` classes, or
    not finite."""
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
    return logits


@dataclass(frozen=True, slots=True)
class SharedCall:
    """An inference request that can share an upstream call with others (see
    :mod:`service.serving.upstream_batching`): its inputs decoded, what a call for it must look like, and the
    form (JSON or binary) of each upstream output the client asked for."""

    inputs: list[tuple[str, np.ndarray]]
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[str, ...] | None
    binary_of: dict[str, bool]
    binary_default: bool

    @property
    def rows(self) -> int:
        return self.inputs[0][1].shape[0]


_REQUEST_FIELDS = frozenset({"id", "inputs", "outputs", "parameters"})
_INPUT_FIELDS = frozenset({"name", "datatype", "shape", "data", "parameters"})


def shared_call(document: Mapping[str, Any], binary: bytes) -> SharedCall | None:
    """The request as a :class:`SharedCall`, or None when it must go upstream alone, as it came: anything
    beyond numeric tensors with a batch dimension and the binary-data flags (request parameters such as a
    sequence id or a priority, BYTES tensors, a classification output) is the upstream's to read, per
    request."""
    if not _REQUEST_FIELDS.issuperset(document):
        return None
    parameters = document.get("parameters") or {}
    # seed is calibserve's own (randomised prediction sets): never sent upstream
    if not isinstance(parameters, Mapping) or not {"binary_data_output", "seed"}.issuperset(parameters):
        return None
    binary_default = parameters.get("binary_data_output", False)
    entries = document.get("inputs")
    if not isinstance(entries, list) or not entries or not isinstance(binary_default, bool):
        return None
    try:
        chunks = wire.tensor_chunks(entries, binary, "inputs")
        inputs = []
        for entry, chunk in zip(entries, chunks, strict=True):
            name = entry.get("name")
            if (
                not isinstance(name, str)
                or not _INPUT_FIELDS.issuperset(entry)
                or not {"binary_data_size"}.issuperset(entry.get("parameters") or {})
            ):
                return None
            inputs.append((name, wire.tensor_array(entry, chunk, f"input {name!r}")))
    except InvalidInput:  # the upstream says what is wrong with it, in its own words
        return None
    if len({array.shape[0] for _, array in inputs}) != 1 or inputs[0][1].shape[0] == 0:
        return None
    requested = document.get("outputs")
    outputs, binary_of = None, {}
    if requested is not None:
        if not isinstance(requested, list):
            return None
        for item in requested:
            output_parameters = item.get("parameters") or {} if isinstance(item, Mapping) else None
            if (
                not isinstance(output_parameters, Mapping)
                or not {"name", "parameters"}.issuperset(item)
                or not {"binary_data"}.issuperset(output_parameters)
                or not isinstance(item.get("name"), str)
                or not isinstance(output_parameters.get("binary_data", False), bool)
            ):
                return None
            if "binary_data" in output_parameters:
                binary_of[item["name"]] = output_parameters["binary_data"]
        outputs = tuple(item["name"] for item in requested if item["name"] not in OWN_OUTPUTS)
    signature = tuple((name, wire.datatype_of(array), array.shape[1:]) for name, array in inputs)
    return SharedCall(inputs, signature, outputs, binary_of, binary_default)


def expected_classes(info: ModelInfo, entry: ActiveCalibrator) -> int | None:
    if info.num_classes is not None:
        return info.num_classes
    return getattr(entry.calibrator, "num_classes_", None)


class UpstreamModels:
    """Inference, logits and metadata of upstream models, over this worker's :class:`Upstreams`."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams
        self.batcher = UpstreamBatcher() if upstreams.share_calls else None

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
            key: response.headers[key]
            for key in ("content-type", wire.HEADER_LENGTH.lower())
            if key in response.headers
        }
        return PassedThrough(memoryview(response.content), kept)

    async def infer(
        self, info: ModelInfo, entry: ActiveCalibrator, document: Mapping[str, Any], binary: bytes
    ) -> UpstreamAnswer:
        """One inference request of a client: its inputs upstream unchanged, its outputs less calibserve's
        own, plus the logits output (binary: exact and cheap); the answer read and checked. Requests that can
        share a call with others in flight meanwhile do (:meth:`infer_shared`)."""
        client, spec = self.client(info)
        if self.batcher is not None:
            answer = await self.infer_shared(info, entry, client, spec, document, binary)
            if answer is not None:
                return answer
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

    async def infer_shared(
        self,
        info: ModelInfo,
        entry: ActiveCalibrator,
        client: UpstreamClient,
        spec: UpstreamSpec,
        document: Mapping[str, Any],
        binary: bytes,
    ) -> UpstreamAnswer | None:
        """The answer to the request, from one upstream call with the requests of the same shape that queued
        while another was in flight; None where the model takes no batches (its server states no
        ``max_batch_size``: asked first, from the cache, so that no request of such a model is decoded for
        nothing), the request cannot share a call (:func:`shared_call`) or is larger than one, or an output is
        not numbers."""
        max_rows = await client.max_batch_size(spec)
        if max_rows is None:
            return None
        call = shared_call(document, binary)
        if call is None or call.rows > max_rows:
            return None
        metadata = await client.model_metadata(spec)
        declared = {
            str(item.get("name")): item.get("datatype")
            for item in metadata.get("outputs", [])
            if isinstance(item, Mapping)
        }
        logits_name = logits_output(spec, list(declared))
        passed = call.outputs if call.outputs is not None else tuple(declared)
        asked = (*passed, logits_name) if logits_name not in passed else passed
        if any(declared.get(name) not in wire.NUMPY_TYPES for name in asked):
            return None

        async def send(inputs: Named) -> tuple[Any, dict[str, np.ndarray]]:
            entries, chunks = zip(*(wire.binary_entry(name, array) for name, array in inputs), strict=True)
            request = {
                "inputs": list(entries),
                "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in asked],
            }
            answer, binary = await client.infer(spec, request, list(chunks))
            arrays = {}
            for name, (output, chunk) in self.outputs(spec, answer, binary).items():
                try:
                    arrays[name] = wire.tensor_array(output, chunk, f"output {name!r} of {spec.model!r}")
                except InvalidInput as exc:
                    raise UpstreamFailed(f"upstream {client.url}: {exc}") from None
            if logits_name not in arrays:
                raise UpstreamFailed(
                    f"upstream model {spec.model!r} answered no output {logits_name!r} (its logits)"
                )
            return answer.get("model_version"), arrays

        key = (client.url, spec, call.signature, asked)
        model_version, arrays = await self.batcher.infer(key, call.inputs, max_rows=max_rows, send=send)
        where = f"upstream model {spec.model!r} (model {info.name!r})"
        _check_float(wire.datatype_of(arrays[logits_name]), logits_name, where)
        logits = checked_logits(arrays[logits_name], where, expected_classes(info, entry))
        outputs = {}
        for name in passed:
            if name in arrays:
                binary = call.binary_of.get(name, call.binary_default)
                outputs[name] = wire.tensor_entry(name, arrays[name], binary=binary)
        document = {
            "model_name": spec.model,
            "model_version": model_version,
            "outputs": [e for e, _ in outputs.values()],
        }
        return UpstreamAnswer(document, outputs, logits_name, logits, wire.datatype_of(arrays[logits_name]))

    def read_answer(
        self,
        info: ModelInfo,
        spec: UpstreamSpec,
        entry: ActiveCalibrator,
        document: dict[str, Any],
        binary: bytes,
        logits_name: str | None,
    ) -> UpstreamAnswer:
        outputs = self.outputs(spec, document, binary)
        name = logits_name or logits_output(spec, list(outputs))
        if name not in outputs:
            raise UpstreamFailed(f"upstream model {spec.model!r} answered no output {name!r} (its logits)")
        logits, datatype = read_logits(info, spec, *outputs[name], expected_classes(info, entry))
        return UpstreamAnswer(document, outputs, name, logits, datatype)

    @staticmethod
    def outputs(
        spec: UpstreamSpec, document: Mapping[str, Any], binary: bytes
    ) -> dict[str, tuple[dict[str, Any], bytes | None]]:
        """An upstream answer's outputs by name: ``(entry, binary bytes or None)``."""
        entries = document.get("outputs")
        if not isinstance(entries, list):
            raise UpstreamFailed(f"upstream model {spec.model!r} answered no outputs list")
        try:
            chunks = wire.tensor_chunks(entries, binary, f"outputs of upstream model {spec.model!r}")
        except InvalidInput as exc:
            raise UpstreamFailed(str(exc)) from None
        return {str(item.get("name")): (item, chunk) for item, chunk in zip(entries, chunks, strict=True)}

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
