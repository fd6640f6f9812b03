"""The Open Inference Protocol without a server: requests parsed, answers built, the native answer rebuilt."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from severstal.serve import oip

RECORD = {"height": 256, "width": 1600,
          "defects": [
              {"class_id": 3, "score": 0.875, "bbox": [10.5, 2.0, 40.25, 30.0], "area": 120, "rle": "5 10 261 10"},
              {"class_id": 1, "score": 0.5, "bbox": [100.0, 0.0, 101.0, 1.0], "area": 1, "rle": "25601 1"}],
          "classes": {"1": "25601 1", "2": "", "3": "5 10 261 10", "4": ""}}


def test_a_binary_request_round_trips_the_image_and_its_id():
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    body, headers = oip.encode_infer_request(image, request_id="r-1")
    parsed = oip.parse_infer_request(body, {k.upper(): v for k, v in headers.items()})  # header names any case
    assert parsed == oip.InferRequest(image, "r-1", None)
    assert oip.is_infer_request(body, headers)


def test_a_json_request_carries_the_image_as_base64_and_may_come_decoded():
    image = b"\xff\xd8\xff\xe0 a jpeg"
    body, headers = oip.encode_infer_request(image, binary=False)
    assert headers == {"Content-Type": "application/json"}
    assert oip.parse_infer_request(body).image == image
    decoded = json.loads(body)  # TorchServe decodes application/json bodies before the handler sees them
    assert oip.is_infer_request(decoded) and oip.parse_infer_request(decoded).image == image


def test_images_are_not_infer_requests():
    for body in (b"\xff\xd8\xff\xe0", b"", b"{not json", "text", {"image": "x"}, None):
        assert not oip.is_infer_request(body), body


@pytest.mark.parametrize("request_json, words", [
    ({"inputs": []}, "a list of one tensor"),
    ({"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}, "unknown input 'input-0'"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}]}, "datatype 'UINT8'"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["eA==", "eA=="]}]}, "one image per"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [1]}]}, "one base64 string"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}, "not base64"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}], "outputs": [{"name": "x"}]},
     "unknown outputs ['x']"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_requests_say_what_is_expected(request_json, words):
    with pytest.raises(oip.ProtocolError, match=words.replace("[", r"\[").replace("]", r"\]")) as caught:
        oip.parse_infer_request(json.dumps(request_json).encode())
    assert caught.value.status == 400


def test_bad_binary_framing_is_refused():
    body, headers = oip.encode_infer_request(b"abcdef")
    with pytest.raises(oip.ProtocolError, match="Inference-Header-Content-Length is"):
        oip.parse_infer_request(body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)})
    with pytest.raises(oip.ProtocolError, match="binary_data_size"):
        oip.parse_infer_request(body + b"extra", headers)
    head = body[: int(headers["Inference-Header-Content-Length"])]
    two = head + struct.pack("<I", 3) + b"abc"  # claims 3 bytes where binary_data_size says 10
    with pytest.raises(oip.ProtocolError):
        oip.parse_infer_request(two, headers)
    with pytest.raises(oip.ProtocolError, match="not valid JSON"):
        oip.parse_infer_request(b"{" + body[1:], {"Inference-Header-Content-Length": "3"})


def test_the_answer_holds_rle_and_detections_and_rebuilds_the_native_answer():
    request = oip.InferRequest(b"", "abc")
    answer = oip.infer_response(RECORD, "severstal", "1.0", request)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("severstal", "1.0", "abc")
    tensors = {o["name"]: o for o in answer["outputs"]}
    assert list(tensors) == list(oip.OUTPUTS)
    assert tensors["classes"] == {"name": "classes", "datatype": "BYTES", "shape": [4],
                                  "data": ["25601 1", "", "5 10 261 10", ""]}
    assert tensors["boxes"]["shape"] == [2, 4] and len(tensors["boxes"]["data"]) == 8
    assert tensors["image_size"]["data"] == [256, 1600]
    for tensor in answer["outputs"]:  # what a client reshapes: data fills the shape
        assert np.array(tensor["data"]).size == int(np.prod(tensor["shape"])), tensor["name"]
    assert oip.record_from_response(json.loads(json.dumps(answer))) == RECORD


def test_asked_outputs_only_and_an_empty_answer():
    empty = {"height": 2, "width": 3, "defects": [], "classes": dict.fromkeys("1234", "")}
    answer = oip.infer_response(empty, "m", request=oip.InferRequest(b"", None, ("image_size", "scores")))
    assert [(o["name"], o["shape"], o["data"]) for o in answer["outputs"]] == [("image_size", [2], [2, 3]),
                                                                               ("scores", [0], [])]
    assert "id" not in answer and "model_version" not in answer
    with pytest.raises(oip.ProtocolError, match="lacks outputs"):
        oip.record_from_response(answer)
    assert oip.record_from_response(oip.infer_response(empty, "m")) == empty


def test_model_metadata_names_the_input_and_outputs():
    meta = oip.model_metadata("severstal", ["1.0"])
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert [o["name"] for o in meta["outputs"]] == list(oip.OUTPUTS)
    assert oip.error_body("x") == {"error": "x"}
    assert base64.b64decode(oip.encode_infer_request(b"z", binary=False)[0].split(b'"data": ["')[1][:4]) == b"z"
