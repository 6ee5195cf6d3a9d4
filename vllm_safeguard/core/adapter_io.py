"""Reading and writing PEFT LoRA adapter folders, treating every byte as untrusted.

Reading order (each step refuses with :class:`AdapterValidationError` naming file, key, value):

1. the folder: ``adapter_config.json`` + ``adapter_model.safetensors``, regular files inside the
   folder (no symlink escaping it); pickle checkpoints (``.bin``/``.pt``) are refused by default;
2. the config, parsed as plain JSON data (nothing named in it is imported or resolved);
3. the safetensors header, parsed and checked (size, dtype, shapes, offsets, duplicates) *before*
   any tensor is materialized;
4. the LoRA key names and shapes against ``r`` / ``rank_pattern`` and the base model's shapes;
5. the tensors, read with ``safetensors.safe_open`` and checked to be finite.

Writing is atomic: a temp folder next to the target, then a rename.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AdapterValidationError
from .adapter import PEFT_PREFIX, LoRAAdapter, LoRAModule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

# safetensors dtype tag -> (torch dtype, bytes per element)
_ALLOWED_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
}
_TORCH_TO_TAG = {v[0]: k for k, v in _ALLOWED_DTYPES.items()}

# Fix (hardening): ``\Z`` instead of ``$`` (which also matches before a trailing newline), and a
# module path is non-empty dotted components (no "..", no leading or trailing dot).
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.lora_(?P<ab>[AB])\.weight\Z"
)
# rank_pattern keys are untrusted regular expressions (vLLM and PEFT match them with re.match). We read
# them with the same rule but accept only this charset ("." is still the regex wildcard), so a hostile
# pattern cannot backtrack catastrophically; any other regex feature is refused with a 400.
_PATTERN_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,256}\Z")
# Config fields that would make a loader import or resolve code, or bypass the repair; and the PEFT
# features vLLM refuses (vllm/lora/peft_helper.py ``_validate_features``), refused here before any
# tensor is read so the client gets a 400 naming the field, not a late "vLLM could not load" error.
_FORBIDDEN_NON_NULL = {
    "auto_mapping": "names custom code to import",
    "modules_to_save": "ships full weights that bypass the LoRA repair",
    "layer_replication": "rewires base layers (vLLM does not support layer_replication)",
    "lora_bias": "adds a bias vLLM does not support (lora_bias)",
    "alora_invocation_tokens": "is Activated LoRA (aLoRA), which vLLM does not support",
    "use_bdlora": "is block-diagonal LoRA (BD-LoRA), which vLLM does not support",
    "use_qalora": "is QALoRA, which vLLM does not support",
}
# init_lora_weights values whose saved adapter is a plain LoRA (vLLM's ``_init_is_supported``); other
# strings (PiSSA, OLoRA, CorDA, LoftQ) modify the base weights when PEFT loads the adapter.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


# Largest lora_alpha / alpha_pattern value accepted (real adapters use at most a few thousand).
_MAX_ALPHA = 1e12


def _finite_number(v: Any) -> bool:
    """A JSON number (not a bool) that is finite.

    Fix: ``math.isfinite`` raises ``OverflowError`` on ints beyond float range, and JSON integers
    are unbounded (``"lora_alpha": 1000...0``), so ints are never converted; callers compare them.
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


@dataclass(frozen=True)
class AdapterLimits:
    """Bounds on untrusted adapter files. Every field is a hard refusal threshold.

    Attributes:
        max_rank: largest LoRA rank accepted (``r`` and every ``rank_pattern`` value).
        max_tensors: most tensors in the safetensors file.
        max_total_bytes: largest sum of tensor bytes (also caps the file size).
        max_header_bytes: largest safetensors JSON header.
        max_config_bytes: largest ``adapter_config.json``.
        max_string_chars: longest string anywhere in the config.
        allow_pickle: accept ``.bin``/``.pt`` checkpoints (never by default: unpickling runs code).
    """

    max_rank: int = 256
    max_tensors: int = 4096
    max_total_bytes: int = 4 * 1024**3
    max_header_bytes: int = 8 * 1024**2
    max_config_bytes: int = 256 * 1024
    max_string_chars: int = 4096
    allow_pickle: bool = False


DEFAULT_LIMITS = AdapterLimits()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _fail(problem: str, file: Path | str, key: str | None = None, value: object = None, **kw: Any) -> None:
    raise AdapterValidationError(problem, file=str(file), key=key, value=value, **kw)


# ----------------------------------------------------------------------------------------- folder


def _contained_file(folder: Path, name: str) -> Path | None:
    """The file ``folder/name`` if it exists, refusing anything that resolves outside ``folder``."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(folder)]) != os.path.realpath(folder):
        _fail("file is a link that escapes the adapter folder", path, value=real)
    if not os.path.isfile(real):
        _fail("not a regular file", path)
    return Path(real)


def locate_adapter_files(
    folder: str | os.PathLike[str], limits: AdapterLimits = DEFAULT_LIMITS
) -> tuple[Path, Path]:
    """Return ``(config_path, weights_path)`` of a PEFT adapter folder, or refuse."""
    root = Path(folder)
    if not root.is_dir():
        _fail("adapter path is not a directory", root)
    cfg = _contained_file(root, CONFIG_NAME)
    weights = _contained_file(root, WEIGHTS_NAME)
    if weights is None:
        pickles = [n for n in PICKLE_NAMES if os.path.lexists(root / n)]
        if pickles and not limits.allow_pickle:
            _fail(
                "only a pickle checkpoint was found; pickles can execute code when loaded and are "
                "refused (convert the adapter to safetensors)",
                root / pickles[0],
            )
        _fail(f"missing {WEIGHTS_NAME}", root)
    if cfg is None:
        _fail(f"missing {CONFIG_NAME}", root)
    assert cfg is not None and weights is not None
    return cfg, weights


# ----------------------------------------------------------------------------------------- config


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _check_strings(obj: Any, file: Path, limits: AdapterLimits, path: str = "") -> None:
    if isinstance(obj, str):
        if len(obj) > limits.max_string_chars:
            _fail(
                f"string longer than {limits.max_string_chars} characters",
                file,
                key=path or "<root>",
                value=f"<{len(obj)} chars>",
            )
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, file, limits, path)
            _check_strings(v, file, limits, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_strings(v, file, limits, f"{path}[{i}]")


def _pairs_no_duplicates(file: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                _fail("duplicate key in JSON object", file, key=k)
            out[k] = v
        return out

    return hook


def read_adapter_config(path: Path, limits: AdapterLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse ``adapter_config.json`` as plain data and check the LoRA fields this package uses."""
    size = path.stat().st_size
    if size > limits.max_config_bytes:
        _fail(f"config larger than {limits.max_config_bytes} bytes", path, value=size)
    raw = path.read_bytes()
    try:
        cfg = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_pairs_no_duplicates(path)
        )
    except AdapterValidationError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(f"config is not valid JSON: {e}", path)
    if not isinstance(cfg, dict):
        _fail("config must be a JSON object", path, value=type(cfg).__name__)
    _check_strings(cfg, path, limits)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        _fail("only LoRA adapters are supported", path, key="peft_type", value=peft_type)
    for name, why in _FORBIDDEN_NON_NULL.items():
        if cfg.get(name) not in (None, False, [], {}):
            _fail(f"field is not allowed: it {why}", path, key=name, value=cfg[name])
    if cfg.get("use_dora"):
        _fail("DoRA adapters are not supported", path, key="use_dora", value=cfg["use_dora"])
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        _fail(
            "this init modifies the base weights (PiSSA/OLoRA/CorDA/LoftQ); vLLM does not support it",
            path,
            key="init_lora_weights",
            value=init,
        )
    elif not isinstance(init, (bool, str)):
        _fail("must be a boolean or an init name", path, key="init_lora_weights", value=init, has_value=True)
    if cfg.get("bias", "none") != "none":
        _fail("adapter bias is not supported by vLLM", path, key="bias", value=cfg.get("bias"))
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:  # vLLM's PEFTHelper requires them; PEFT's own defaults differ from ours
            _fail("required field is missing", path, key=key)
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= limits.max_rank:
        _fail(f"rank must be an integer in [1, {limits.max_rank}]", path, key="r", value=r, has_value=True)
    alpha = cfg.get("lora_alpha", r)
    if not _finite_number(alpha) or not 0 < alpha <= _MAX_ALPHA:
        _fail(
            f"lora_alpha must be a positive finite number (at most {_MAX_ALPHA:g})",
            path,
            key="lora_alpha",
            value=alpha,
            has_value=True,
        )
    for field_name, lo, hi in (("rank_pattern", 1, limits.max_rank), ("alpha_pattern", 1e-12, _MAX_ALPHA)):
        pat = cfg.get(field_name) or {}
        if not isinstance(pat, dict):
            _fail("must be a mapping of module path -> number", path, key=field_name, value=pat)
        if len(pat) > limits.max_tensors:
            _fail("too many entries", path, key=field_name, value=len(pat))
        for k, v in pat.items():
            if not _PATTERN_KEY_RE.match(k):
                _fail(
                    "pattern keys must be plain module paths (regex features are refused)",
                    path,
                    key=f"{field_name}.{k}",
                    value=k,
                )
            ok = _finite_number(v) and lo <= v <= hi
            if field_name == "rank_pattern":
                ok = ok and isinstance(v, int)
            if not ok:
                _fail(
                    f"value must be a number in [{lo}, {hi}]",
                    path,
                    key=f"{field_name}.{k}",
                    value=v,
                    has_value=True,
                )
    return cfg


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """vLLM's ``PEFTHelper._match_pattern`` (= PEFT's ``get_pattern_key``): each key is a regular
    expression matched as ``(.*\\.)?(key)$`` against the module path, and the first key that matches (in
    the file's order) wins. Keys are limited to ``[A-Za-z0-9_.-]`` by :func:`read_adapter_config`, so
    ``.`` is the regex wildcard here too (``q.proj`` matches ``q_proj``, as it does in vLLM) and no key
    can backtrack catastrophically. ``tests/plugin/test_canonical_vllm.py`` compares this reading with
    vLLM's own on random patterns."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_rank(cfg: Mapping[str, Any], module: str) -> int:
    return int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))


def module_scaling(cfg: Mapping[str, Any], module: str) -> float:
    r = module_rank(cfg, module)
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", cfg["r"])))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


# ----------------------------------------------------------------------------------------- header


def read_safetensors_header(path: Path, limits: AdapterLimits = DEFAULT_LIMITS) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without materializing any tensor."""
    file_size = path.stat().st_size
    if file_size > limits.max_total_bytes + limits.max_header_bytes + 8:
        _fail(f"file larger than the {limits.max_total_bytes}-byte limit", path, value=file_size)
    if file_size < 8:
        _fail("file too short to hold a safetensors header", path, value=file_size)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > limits.max_header_bytes:
            _fail(
                f"header length over the {limits.max_header_bytes}-byte limit", path, key="<header>", value=n
            )
        if 8 + n > file_size:
            _fail("header length runs past the end of the file", path, key="<header>", value=n)
        raw = f.read(n)
    try:
        header = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_pairs_no_duplicates(path)
        )
    except AdapterValidationError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(f"header is not valid JSON: {e}", path, key="<header>")
    if not isinstance(header, dict):
        _fail("header must be a JSON object", path, key="<header>", value=type(header).__name__)
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        _fail(f"more than {limits.max_tensors} tensors", path, value=len(header))
    data_len = file_size - 8 - n
    infos: dict[str, TensorInfo] = {}
    total = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            _fail("malformed tensor entry", path, key=name, value=entry)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        # Fix: an unhashable dtype (list/object) made the dict lookup raise TypeError.
        if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
            _fail("dtype not allowed (fp16, bf16, fp32 only)", path, key=name, value=dtype, has_value=True)
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or len(shape) > 8
        ):
            _fail("malformed shape", path, key=name, value=shape, has_value=True)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            _fail("malformed data_offsets", path, key=name, value=offsets, has_value=True)
        start, end = offsets
        numel = math.prod(shape)
        nbytes = numel * _ALLOWED_DTYPES[dtype][1]
        # Fix: refuse zip-bomb-like size claims up front. Before, a shape such as [10**4000, 10**4000]
        # with empty offsets reached the span message below, whose int formatting raised ValueError.
        if nbytes > limits.max_total_bytes:
            _fail(
                f"tensor shape claims more than the {limits.max_total_bytes}-byte limit",
                path,
                key=name,
                value=shape,
                has_value=True,
            )
        if not 0 <= start <= end <= data_len:
            _fail(f"data_offsets outside the {data_len}-byte data section", path, key=name, value=offsets)
        if end - start != nbytes:
            _fail(
                f"data_offsets span {end - start} bytes but shape {shape} x {dtype} needs {nbytes}",
                path,
                key=name,
                value=offsets,
            )
        total += nbytes
        if total > limits.max_total_bytes:
            _fail(f"tensors total more than {limits.max_total_bytes} bytes", path, key=name, value=total)
        infos[name] = TensorInfo(name, dtype, tuple(shape), start, end)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (s0, e0, n0), (s1, _e1, n1) in itertools.pairwise(spans):
        if s1 < e0:
            _fail(f"tensor data overlaps tensor {n0!r}", path, key=n1, value=[s0, e0])
    return infos


# ----------------------------------------------------------------------------------------- adapter


def _parse_key(name: str, file: Path) -> tuple[str, str]:
    m = _KEY_RE.match(name)
    if m is None:
        _fail(
            "key is not a LoRA weight name (expected base_model.model.<module>.lora_A.weight / lora_B.weight)",
            file,
            key=name,
        )
    assert m is not None
    return m.group("module"), m.group("ab")


def load_adapter(
    folder: str | os.PathLike[str],
    *,
    limits: AdapterLimits = DEFAULT_LIMITS,
    base_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> LoRAAdapter:
    """Read and validate a PEFT LoRA adapter folder.

    Args:
        folder: the adapter directory.
        limits: refusal thresholds for untrusted files.
        base_shapes: ``module path -> (out_features, in_features)`` of the base model; when given,
            every adapted module must exist there with matching shapes.

    Raises:
        AdapterValidationError: on any problem, naming the file, key and bad value.
    """
    try:
        cfg_path, w_path = locate_adapter_files(folder, limits)
        cfg = read_adapter_config(cfg_path, limits)
        infos = read_safetensors_header(w_path, limits)
    except OSError as e:  # Fix: over-long name, unreadable or vanished file: still a typed refusal
        _fail(f"cannot read the adapter files: {e.strerror or e}", os.fspath(folder))
    if not infos:
        _fail("adapter has no tensors", w_path)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in infos.items():
        module, side = _parse_key(name, w_path)
        pairs.setdefault(module, {})[side] = info
    dtypes = {i.dtype for i in infos.values()}
    if len(dtypes) > 1:
        _fail("tensors mix dtypes", w_path, value=sorted(dtypes))
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            _fail(
                f"lora_{missing} missing for module",
                w_path,
                key=f"{PEFT_PREFIX}{module}.lora_{missing}.weight",
            )
        a, b = ab["A"], ab["B"]
        r = module_rank(cfg, module)
        if len(a.shape) != 2 or len(b.shape) != 2:
            _fail(
                "LoRA factors must be 2-D",
                w_path,
                key=a.name if len(a.shape) != 2 else b.name,
                value=list(a.shape if len(a.shape) != 2 else b.shape),
            )
        if 0 in a.shape or 0 in b.shape:
            _fail(
                "empty tensor",
                w_path,
                key=a.name if 0 in a.shape else b.name,
                value=list(a.shape if 0 in a.shape else b.shape),
            )
        if a.shape[0] != r:
            _fail(f"lora_A must have shape [r={r}, in]", w_path, key=a.name, value=list(a.shape))
        if b.shape[1] != r:
            _fail(f"lora_B must have shape [out, r={r}]", w_path, key=b.name, value=list(b.shape))
        if base_shapes is not None:
            if module not in base_shapes:
                _fail("module does not exist in the base model", w_path, key=a.name, value=module)
            out_f, in_f = base_shapes[module]
            if (b.shape[0], a.shape[1]) != (out_f, in_f):
                _fail(
                    f"shapes do not fit the base module [{out_f}, {in_f}]",
                    w_path,
                    key=a.name,
                    value=[b.shape[0], a.shape[1]],
                )
    dtype = _ALLOWED_DTYPES[dtypes.pop()][0]
    modules: dict[str, LoRAModule] = {}
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            for module, ab in sorted(pairs.items()):
                tensors = []
                for info in (ab["A"], ab["B"]):
                    t = f.get_tensor(info.name).to(torch.float32)
                    if not torch.isfinite(t).all():
                        bad = t[~torch.isfinite(t)].flatten()[0].item()
                        _fail(
                            "tensor holds non-finite values", w_path, key=info.name, value=bad, has_value=True
                        )
                    tensors.append(t)
                scaling = module_scaling(cfg, module)
                # Fix: finite factors can still make a non-finite update (huge lora_alpha, or huge A and
                # B). Bound |scaling * B| by the source dtype (repaired adapters are written back in it)
                # and |delta_W| <= r * max|A| * max|scaling * B| by fp32, where the maths is done.
                a_max = float(tensors[0].abs().max())
                sb_max = float((tensors[1] * scaling).abs().max())
                fits = _delta_fits_fp32(a_max, sb_max, tensors[0].shape[0])
                if not sb_max <= torch.finfo(dtype).max or not fits:
                    _fail(
                        "scaled update (lora_alpha / r) * B @ A overflows",
                        w_path,
                        key=ab["B"].name,
                        value=scaling,
                        has_value=True,
                    )
                modules[module] = LoRAModule(module, tensors[0], tensors[1], scaling)
    except AdapterValidationError:
        raise
    except Exception as e:  # safetensors' own parser refused something our pre-check let through
        _fail(f"safetensors could not read the file: {e}", w_path)
    return LoRAAdapter(config=cfg, modules=modules, dtype=dtype, source=str(folder))


def _delta_fits_fp32(a_max: float, sb_max: float, rank: int) -> bool:
    """Whether ``rank * a_max * sb_max`` (a bound on every entry of ``scaling * B @ A``) fits fp32."""
    return math.isfinite(a_max * sb_max * rank) and a_max * sb_max * rank <= torch.finfo(torch.float32).max


def peft_key(module: str, ab: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{ab}.weight"


def adapter_state_dict(
    adapter: LoRAAdapter, *, pad_to: int | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Tensors in PEFT naming with the scaling folded into B and ranks zero-padded to one rank.

    A single rank with ``lora_alpha == r`` (scaling 1) is read identically by peft and vLLM;
    vLLM ignores ``rank_pattern``, so per-module ranks are padded instead. Zero rows/columns add
    nothing to ``B @ A``.
    """
    rank = max(adapter.max_rank, pad_to or 0)
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        a = torch.zeros(rank, m.in_features)
        b = torch.zeros(m.out_features, rank)
        a[: m.rank] = m.lora_a
        b[:, : m.rank] = m.scaled_b()
        out[peft_key(name, "A")] = a.to(adapter.dtype).contiguous()
        out[peft_key(name, "B")] = b.to(adapter.dtype).contiguous()
    return out, rank


def write_folder_atomically(folder: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temp folder next to ``folder``; its files are fsynced, then the temp folder
    replaces ``folder`` by renames (a reader sees the old folder or the new one, never half of one)."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_adapter(adapter: LoRAAdapter, folder: str | os.PathLike[str], *, pad_to: int | None = None) -> Path:
    """Write ``adapter`` as a PEFT folder, atomically (temp folder + rename). Returns the folder."""
    tensors, rank = adapter_state_dict(adapter, pad_to=pad_to)
    cfg = dict(adapter.config)
    cfg.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in adapter.modules}),
    )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **adapter.metadata})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))

    return write_folder_atomically(folder, write)


def _torch_tag(dtype: torch.dtype) -> str:
    return _TORCH_TO_TAG[dtype]
