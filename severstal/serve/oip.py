"""The Open Inference Protocol (KServe v2 REST) for the severstal model: requests in, answers out, no model.

The protocol is the one contract of KServe, Triton, MLServer and TorchServe's ``/v2`` routes, so a client
written against it (``tritonclient.http``, or :func:`severstal.serve.client.post_image` on a ``/v2`` URL)
keeps working when the server changes. Both of the project's servers speak it through this module:
the TorchServe handler and the Ray Serve deployment (:mod:`severstal.serve.worker` calls it).

The model's tensors (:func:`model_metadata`):

* input ``image``: ``BYTES``, shape ``[1]``, the encoded JPEG/PNG. In JSON the element is a base64 string;
  with the binary tensor extension (what ``tritonclient`` sends by default) it is the raw bytes, as the
  extension frames them (a 4-byte little-endian length, then the bytes).
* outputs, never pixel arrays: ``classes`` (``BYTES [4]``, the Kaggle RLE of the class masks 1..4, ``""``
  for an empty one), the detections ``boxes`` (``FP32 [N, 4]``, x0 y0 x1 y1), ``scores`` (``FP32 [N]``),
  ``class_ids`` (``INT32 [N]``), ``areas`` (``INT64 [N]``), ``rles`` (``BYTES [N]``, each detection's mask)
  and ``image_size`` (``INT32 [2]``: height, width). They hold exactly the native answer
  (:func:`record_from_response` rebuilds it), so both routes give the same class masks.

Errors answer the protocol's body ``{"error": "<message>"}`` with the same status as the native route
(400 naming what is wrong, 413, 415, 500, 507).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INPUT_NAME = "image"
"""The one input of the model: the encoded image."""
BINARY_HEADER = "inference-header-content-length"
"""Request header of the binary tensor extension: the length of the JSON part before the binary data."""
CLASS_IDS = ("1", "2", "3", "4")
"""The keys of the native answer's ``classes``, in the order of the ``classes`` output."""
OUTPUTS = {
    "classes": ("BYTES", [4]),
    "boxes": ("FP32", [-1, 4]),
    "scores": ("FP32", [-1]),
    "class_ids": ("INT32", [-1]),
    "areas": ("INT64", [-1]),
    "rles": ("BYTES", [-1]),
    "image_size": ("INT32", [2]),
}
"""Output name -> (datatype, shape; -1: the number of detections)."""


class ProtocolError(ValueError):
    """A request the protocol cannot take; ``status`` is the HTTP status to answer (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    """What the server needs of one ``infer`` request.

    Attributes:
        image: the encoded image (bytes of the ``image`` input).
        request_id: the request's ``id``, echoed in the answer; None when the client sent none.
        outputs: the outputs asked for, in order; None: all of :data:`OUTPUTS`.
    """

    image: bytes
    request_id: str | None = None
    outputs: tuple[str, ...] | None = None


def _header(headers: Mapping | None, name: str) -> str | None:
    """A request header by its case-insensitive name."""
    for key, value in (headers or {}).items():
        if str(key).lower() == name:
            return value
    return None


def is_infer_request(body, headers: Mapping | None = None) -> bool:
    """Whether a body that came on an unknown route is an ``infer`` request rather than an image.

    TorchServe hands ``/v2/models/NAME/infer`` and ``/predictions/NAME`` to the same handler, so the handler
    tells them by content: a JSON object with ``inputs`` (decoded already when it came as ``application/json``),
    or the binary extension's header. An image never starts with ``{``.
    """
    if isinstance(body, Mapping):
        return "inputs" in body
    if _header(headers, BINARY_HEADER) is not None:
        return True
    if isinstance(body, (bytes, bytearray, str)) and body[:1] in (b"{", "{"):
        try:
            return "inputs" in json.loads(body)
        except ValueError:
            return False
    return False


def _split_binary(body: bytes, headers: Mapping | None) -> tuple[dict, bytes]:
    """The JSON part and the binary part of a body; the binary part is empty without the extension."""
    length = _header(headers, BINARY_HEADER)
    if length is None:
        json_part, binary = body, b""
    else:
        try:
            size = int(length)
        except ValueError:
            raise ProtocolError(f"header Inference-Header-Content-Length must be an integer, got {length!r}") from None
        if not 0 < size <= len(body):
            raise ProtocolError(f"header Inference-Header-Content-Length is {size}, but the body has {len(body)} bytes")
        json_part, binary = body[:size], body[size:]
    try:
        return json.loads(json_part), binary
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"the infer request is not valid JSON ({err})") from None


def parse_infer_request(body, headers: Mapping | None = None) -> InferRequest:
    """Read an ``infer`` request: one ``image`` input of one BYTES element.

    Args:
        body: the request body: bytes (JSON, or JSON then binary data with the extension's header), a str,
            or the JSON object already decoded.
        headers: the request's headers (for ``Inference-Header-Content-Length``).

    Raises:
        ProtocolError: anything else, with a message saying what is expected.
    """
    if isinstance(body, Mapping):
        request, binary = dict(body), b""
    elif isinstance(body, (bytes, bytearray, str)):
        raw = body.encode() if isinstance(body, str) else bytes(body)
        request, binary = _split_binary(raw, headers)
    else:
        raise ProtocolError(f"the infer request must be a JSON object, got {type(body).__name__}")
    if not isinstance(request, Mapping):
        raise ProtocolError(f"the infer request must be a JSON object, got {type(request).__name__}")
    inputs = request.get("inputs")
    expected = f"send one input {INPUT_NAME!r}, datatype BYTES, shape [1]: the encoded JPEG or PNG"
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        raise ProtocolError(f"'inputs' must be a list of one tensor: {expected}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.get('name')!r}: {expected}")
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(f"input {INPUT_NAME!r} has datatype {tensor.get('datatype')!r}: {expected}")
    shape = tensor.get("shape")
    if shape not in ([1], [1, 1]):
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape!r}: one image per request; {expected}")
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        image = _binary_element(binary, parameters["binary_data_size"])
    else:
        image = _json_element(tensor.get("data"))
    outputs = _requested_outputs(request.get("outputs"))
    request_id = request.get("id")
    return InferRequest(image, str(request_id) if request_id not in (None, "") else None, outputs)


def _binary_element(binary: bytes, size) -> bytes:
    """The one element of a BYTES tensor in the binary extension: 4-byte little-endian length, then the bytes."""
    if not isinstance(size, int) or size != len(binary):
        raise ProtocolError(f"binary_data_size is {size!r} but {len(binary)} bytes follow the JSON part")
    if size < 4:
        raise ProtocolError("the binary data of a BYTES tensor starts with a 4-byte length; got less")
    (length,) = struct.unpack_from("<I", binary)
    if length != size - 4:
        raise ProtocolError(f"the BYTES element claims {length} bytes but {size - 4} follow: one image per request")
    return binary[4:]


def _json_element(data) -> bytes:
    """The one element of a BYTES tensor in JSON: a base64 string (a list of one, nested or not)."""
    while isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, str):
        raise ProtocolError(f"input {INPUT_NAME!r} in JSON must hold one base64 string (the encoded image), "
                            f"got {type(data).__name__}; or send it as binary data (Inference-Header-Content-Length)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"input {INPUT_NAME!r} is not base64: in JSON a BYTES image is a base64 string") from None


def _requested_outputs(outputs) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) for o in outputs):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    names = tuple(o.get("name") for o in outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ProtocolError(f"unknown outputs {unknown}; the model has {list(OUTPUTS)}")
    return names


def infer_response(record: Mapping, model_name: str, model_version: str | None = None,
                   request: InferRequest | None = None) -> dict:
    """The protocol's answer for one native answer (``{"height", "width", "defects", "classes"}``).

    Args:
        record: the native REST answer of the image.
        model_name, model_version: echoed in the answer.
        request: the parsed request (its ``id`` and the outputs asked for).
    """
    defects = record["defects"]
    values = {
        "classes": [record["classes"][c] for c in CLASS_IDS],
        "boxes": [float(v) for d in defects for v in d["bbox"]],
        "scores": [float(d["score"]) for d in defects],
        "class_ids": [int(d["class_id"]) for d in defects],
        "areas": [int(d["area"]) for d in defects],
        "rles": [d["rle"] for d in defects],
        "image_size": [int(record["height"]), int(record["width"])],
    }
    names = (request.outputs if request is not None else None) or tuple(OUTPUTS)
    outputs = []
    for name in names:
        datatype, shape = OUTPUTS[name]
        outputs.append({"name": name, "datatype": datatype, "shape": [len(defects) if s == -1 else s for s in shape],
                        "data": values[name]})
    answer = {"model_name": model_name, "outputs": outputs}
    if model_version is not None:
        answer["model_version"] = str(model_version)
    if request is not None and request.request_id is not None:
        answer["id"] = request.request_id
    return answer


def error_body(message: str) -> dict:
    """The protocol's error answer."""
    return {"error": message}


def record_from_response(response: Mapping) -> dict:
    """The native answer from an ``infer`` answer that holds every output: what the client returns for both routes.

    Raises:
        ProtocolError: an output is missing (the request asked for fewer).
    """
    tensors = {o["name"]: o for o in response.get("outputs", [])}
    missing = [n for n in OUTPUTS if n not in tensors]
    if missing:
        raise ProtocolError(f"the answer lacks outputs {missing}: ask for all of them to rebuild the native answer")
    data = {name: tensors[name]["data"] for name in OUTPUTS}
    height, width = data["image_size"]
    boxes = data["boxes"]
    defects = [{"class_id": c, "score": s, "bbox": boxes[4 * i: 4 * i + 4], "area": a, "rle": r}
               for i, (c, s, a, r) in enumerate(zip(data["class_ids"], data["scores"], data["areas"], data["rles"]))]
    return {"height": height, "width": width, "defects": defects, "classes": dict(zip(CLASS_IDS, data["classes"]))}


def encode_infer_request(image: bytes, request_id: str | None = None, binary: bool = True) -> tuple[bytes, dict]:
    """The body and headers of an ``infer`` request for one encoded image.

    Args:
        image: the encoded JPEG/PNG.
        request_id: the request's ``id``.
        binary: the binary tensor extension (the image's bytes as they are); False: base64 in JSON.

    Returns:
        (body, headers).
    """
    tensor = {"name": INPUT_NAME, "datatype": "BYTES", "shape": [1]}
    request: dict = {"inputs": [tensor]}
    if request_id is not None:
        request["id"] = request_id
    if not binary:
        tensor["data"] = [base64.b64encode(image).decode("ascii")]
        return json.dumps(request).encode(), {"Content-Type": "application/json"}
    framed = struct.pack("<I", len(image)) + image
    tensor["parameters"] = {"binary_data_size": len(framed)}
    head = json.dumps(request).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + framed, headers


def model_metadata(name: str, versions: Sequence[str] = (), platform: str = "pytorch_detectron2") -> dict:
    """The answer of ``GET /v2/models/NAME``: the model's input and outputs."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": n, "datatype": t, "shape": list(s)} for n, (t, s) in OUTPUTS.items()],
    }
