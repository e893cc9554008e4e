"""Request checks shared by every Python-backend model: the server never trusts the client.

Copied beside each model's `model.py` (the Python backend puts that folder on `sys.path`), so it
needs nothing but numpy. Each request is checked on its own against the model's config: every
declared input present, its dtype, rank, fixed dims, dynamic dims within limits, size, no empty
tensor, one batch size across inputs, finite floats, UTF-8 strings of bounded length. A bad
request gets an error response; the others of the same `execute()` are answered as usual.
"""

import json

import numpy as np

MAX_TENSOR_BYTES = 1 << 30  # the gRPC message limit the client uses
MAX_DYNAMIC_DIM = 4096  # when the config gives no tighter limit
MAX_STRING_BYTES = 4096

NUMPY_TYPES = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64, "TYPE_STRING": np.object_,
}


class RequestError(ValueError):
    """What is wrong with one request, in one line (sent back to the client)."""


class InputSpec:
    def __init__(self, name, dtype, dims, limits, batched):
        self.name, self.dtype, self.dims, self.limits, self.batched = name, dtype, dims, limits, batched

    @property
    def shape_text(self):
        return ("[batch] + " if self.batched else "") + str(list(self.dims))


def input_specs(config):
    """Specs from the model config dict Triton passes to `initialize` (`args["model_config"]`).

    The optional parameter `input_limits` (JSON: input name -> dims, upper bounds for the -1s)
    is written by the repository writer from the preset."""
    if isinstance(config, str):
        config = json.loads(config)
    params = config.get("parameters", {})
    limits = json.loads(params.get("input_limits", {}).get("string_value", "{}"))
    batched = int(config.get("max_batch_size", 0)) > 0
    specs = []
    for item in config["input"]:
        dims = [int(d) for d in item["dims"]]
        bound = limits.get(item["name"], [MAX_DYNAMIC_DIM if d == -1 else d for d in dims])
        specs.append(InputSpec(item["name"], np.dtype(NUMPY_TYPES[item["data_type"]]), dims, bound, batched))
    return specs


def check_array(spec, array, max_batch=None):
    """Raise RequestError unless `array` is a sound value for input `spec`; return it."""
    name = spec.name
    if not isinstance(array, np.ndarray):
        raise RequestError(f"input {name} is not a tensor")
    if array.dtype != spec.dtype and not (spec.dtype == np.object_ and array.dtype.kind in "OSU"):
        raise RequestError(f"input {name} has dtype {array.dtype}, expected {spec.dtype}")
    item = array.shape[1:] if spec.batched else array.shape
    if array.ndim != len(spec.dims) + spec.batched:
        raise RequestError(f"input {name} has shape {list(array.shape)}, expected {spec.shape_text}")
    if array.size == 0:
        raise RequestError(f"input {name} is empty (shape {list(array.shape)})")
    if spec.batched and max_batch and array.shape[0] > max_batch:
        raise RequestError(f"input {name} has batch {array.shape[0]}, more than {max_batch}")
    for got, want, limit in zip(item, spec.dims, spec.limits):
        if (want != -1 and got != want) or got > limit:
            raise RequestError(f"input {name} has shape {list(array.shape)}, expected {spec.shape_text}"
                               f" with dims at most {list(spec.limits)}")
    if array.nbytes > MAX_TENSOR_BYTES:
        raise RequestError(f"input {name} is {array.nbytes} bytes, more than {MAX_TENSOR_BYTES}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise RequestError(f"input {name} has NaN or Inf values")
    if spec.dtype == np.object_:
        for value in array.reshape(-1):
            text = value if isinstance(value, (bytes, str)) else None
            if text is None:
                raise RequestError(f"input {name} holds a {type(value).__name__}, expected strings")
            if len(text) > MAX_STRING_BYTES:
                raise RequestError(f"input {name} has a string longer than {MAX_STRING_BYTES} bytes")
            if isinstance(text, bytes):
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(f"input {name} is not valid UTF-8") from None
    return array


def read_request(request, specs, get_input, max_batch=None, optional=()):
    """All inputs of one request as checked numpy arrays (`get_input` is
    `pb_utils.get_input_tensor_by_name`). Inputs named in `optional` may be absent."""
    arrays = {}
    for spec in specs:
        tensor = get_input(request, spec.name)
        if tensor is None:
            if spec.name in optional:
                continue
            raise RequestError(f"missing input {spec.name}")
        try:
            array = tensor.as_numpy()
        except Exception as exc:  # a tensor the backend cannot map (e.g. in GPU memory)
            raise RequestError(f"input {spec.name} cannot be read: {exc}") from None
        arrays[spec.name] = check_array(spec, array, max_batch)
    batches = {a.shape[0] for a in arrays.values()} if specs and specs[0].batched else set()
    if len(batches) > 1:
        raise RequestError(f"inputs disagree on the batch size: {sorted(batches)}")
    return arrays


def error_text(exc):
    """One line for the client; never a traceback."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
