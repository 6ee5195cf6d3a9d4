"""Fuzz harness for the untrusted-adapter parser/validator (``vllm_safeguard.core.adapter_io.load_adapter``).

Property: whatever the bytes of ``adapter_config.json`` and ``adapter_model.safetensors``, the only
exception that may escape ``load_adapter`` is :class:`AdapterValidationError`.

Each input is decoded (:class:`Provider`) into 1-4 structured mutations of a small valid adapter:
safetensors header fields (dtype, shape, data_offsets, extra fields, tensor names, entries added,
removed or duplicated), the 8-byte header length, raw header bytes, the data section, config fields
and raw config bytes, and missing / emptied files. Structured mutations keep most inputs deep
enough to reach the shape, rank, base-model and tensor-value checks.

Standalone (longer runs)::

    python -m tests.adversarial.fuzz_adapter_parser --seconds 600            # atheris if installed
    python -m tests.adversarial.fuzz_adapter_parser --engine random --seconds 60 --seed 1

``--engine atheris`` instruments ``vllm_safeguard`` for coverage-guided fuzzing (libFuzzer flags may
follow ``--``); ``--engine random`` feeds seeded random bytes and needs nothing extra. Both print
the executions count; failing inputs are written to ``--crash-dir`` and the exit status is 1.
Replay one: ``python -m tests.adversarial.fuzz_adapter_parser --replay CRASH_FILE``.

Nothing from ``vllm_safeguard`` is imported at module level so atheris can instrument it on import (the
seed adapter is built with the attack corpus's safetensors writer, :mod:`vllm_safeguard.testing.attacks`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# A small base model (1 block, hidden 16) keeps the seed adapter ~2 KB and executions fast.
HIDDEN, FFN, RANK = 16, 32, 2
BASE_SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.k_proj": (HIDDEN // 2, HIDDEN),
    "model.layers.0.self_attn.v_proj": (HIDDEN // 2, HIDDEN),
    "model.layers.0.self_attn.o_proj": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.gate_proj": (FFN, HIDDEN),
    "model.layers.0.mlp.up_proj": (FFN, HIDDEN),
    "model.layers.0.mlp.down_proj": (HIDDEN, FFN),
}
SEED_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")

_INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    4,
    8,
    255,
    256,
    257,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63,
    2**64,
    10**400,
    10**4000,
)
_INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1e-320, 1e-12, 1e12, 1e308, float("inf"), float("-inf"), float("nan"))
_INTERESTING_STRS = (
    "",
    "F32",
    "F16",
    "BF16",
    "I64",
    "F64",
    "F8_E4M3",
    "BOOL",
    "LORA",
    "__metadata__",
    "q_proj",
    "^(a+)+$",
    "../../etc/passwd",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.embed_tokens.weight",
    "base_model.model..model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\n",
    "\x00",
    "\ud800",
    "é" * 3,
)
_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "peft_type",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "target_modules",
    "auto_mapping",
    "modules_to_save",
    "layer_replication",
    "base_model_name_or_path",
    "fan_in_fan_out",
)
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets", "extra")


class Provider:
    """Turns fuzzer bytes into decisions (a minimal ``FuzzedDataProvider``; exhausted input reads 0)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self, nbytes: int) -> int:
        v = 0
        for _ in range(nbytes):
            v = (v << 8) | self.byte()
        return v

    def below(self, n: int) -> int:
        return 0 if n <= 1 else self.uint(2 if n > 256 else 1) % n

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def chunk(self, max_len: int) -> bytes:
        n = self.below(max_len + 1)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def int_list(self) -> list[int]:
        """A shape- / offsets-like list of ints, small or extreme."""
        return [
            self.pick(_INTERESTING_INTS) if self.byte() & 1 else self.below(2**16) - 4
            for _ in range(self.below(10))
        ]

    def value(self, depth: int = 0) -> Any:
        """A JSON-ish value biased towards the boundaries the validator cares about."""
        kind = self.below(12 if depth < 3 else 9)
        if kind == 0:
            return self.below(300) - 2
        if kind == 1:
            v = self.pick(_INTERESTING_INTS)
            return -v if self.byte() & 1 else v
        if kind == 2:
            return self.pick(_INTERESTING_FLOATS)
        if kind == 3:
            return self.pick(_INTERESTING_STRS)
        if kind == 4:
            return self.chunk(24).decode("utf-8", "replace")
        if kind == 5:
            return "x" * self.pick((100, 4097, 70_000))
        if kind == 6:
            return None
        if kind == 7:
            return bool(self.byte() & 1)
        if kind == 8:
            return self.uint(8)
        if kind == 9:
            return [self.value(depth + 1) for _ in range(self.below(4))]
        if kind == 10:
            return self.int_list()
        return {str(self.value(depth + 1)): self.value(depth + 1) for _ in range(self.below(3))}


def seed_parts() -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(config, safetensors header, data section) of a small valid adapter for :data:`BASE_SHAPES`."""
    import torch

    from vllm_safeguard.testing.attacks import split_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in SEED_MODULES:
        out_f, in_f = BASE_SHAPES[m]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.1
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.1
    header, data = split_safetensors(tensors)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
    }
    return cfg, header, data


_SEED: tuple[dict[str, Any], dict[str, Any], bytes] | None = None


def _seed() -> tuple[dict[str, Any], dict[str, Any], bytes]:
    global _SEED
    if _SEED is None:
        _SEED = seed_parts()
    return _SEED


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True, ensure_ascii=False)


def mutate(data: bytes) -> tuple[bytes | None, bytes | None]:
    """Decode ``data`` into mutations of the seed; return (config bytes, weights bytes), None = absent."""
    cfg0, header0, data0 = _seed()
    p = Provider(data)
    cfg: dict[str, Any] = json.loads(json.dumps(cfg0))
    header: dict[str, Any] = json.loads(json.dumps(header0))
    body = bytearray(data0)
    length: int | None = None
    header_text: str | None = None  # set once a text-level header mutation happened
    cfg_bytes: bytes | None = None
    drop = ""
    for _ in range(1 + p.below(4)):
        op = p.below(12)
        names = [k for k in header if k != "__metadata__"] or ["x"]
        if op in (0, 1, 2):  # a field of a tensor entry
            name = p.pick(names)
            entry = header.setdefault(name, {})
            if isinstance(entry, dict):
                field = p.pick(_ENTRY_FIELDS)
                if field == "data_offsets" and p.byte() & 1 and isinstance(entry.get(field), list):
                    entry[field] = [o + p.below(9) - 4 if isinstance(o, int) else o for o in entry[field]]
                elif field == "shape" and p.byte() & 1 and isinstance(entry.get(field), list):
                    entry[field] = list(reversed(entry[field]))
                elif field in ("shape", "data_offsets") and p.byte() & 1:
                    entry[field] = p.int_list()
                else:
                    entry[field] = p.value()
            else:
                header[name] = p.value()
        elif op == 3:  # rename / add / remove a tensor entry
            name = p.pick(names)
            how = p.below(3)
            if how == 0:
                header[p.pick(_INTERESTING_STRS) if p.byte() & 1 else str(p.value())] = header.pop(name, None)
            elif how == 1:
                header.pop(name, None)
            else:
                header["__metadata__"] = p.value()
        elif op == 4:  # the 8-byte header length
            length = p.pick((0, 1, 7, 2**63, 2**64 - 1, 9 * 1024**2, p.uint(8), None))
            if length is None:
                length = -(p.below(16) + 1)  # relative: true length minus a little
        elif op == 5:  # raw header text: overwrite / insert / delete a few characters
            header_text = _mutate_text(p, header_text if header_text is not None else _dumps(header))
        elif op == 6:  # duplicate a header key at text level
            text = header_text if header_text is not None else _dumps(header)
            name = p.pick(names)
            header_text = "{" + _dumps(name) + ": " + _dumps(header.get(name)) + ", " + text[1:]
        elif op == 7:  # data section: truncate, extend, or poke bytes (e.g. NaN/Inf patterns)
            how = p.below(3)
            if how == 0:
                del body[p.below(len(body) + 1) :]
            elif how == 1:
                body += p.chunk(64) or b"\x00" * 4
            elif body:
                at = p.below(len(body))
                body[at : at + 4] = p.pick(
                    (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff", b"\x00\x7c")
                )
        elif op in (8, 9):  # a config field
            key = p.pick(_CONFIG_FIELDS) if p.byte() & 3 else str(p.value())
            if key in ("rank_pattern", "alpha_pattern") and p.byte() & 1:
                cfg[key] = {
                    p.pick(("q_proj", "v_proj", "layers.0.self_attn.q_proj", "k", "^(a+)+$")): p.value()
                }
            else:
                cfg[key] = p.value()
        elif op == 10:  # raw config bytes
            base = cfg_bytes if cfg_bytes is not None else _dumps(cfg).encode("utf-8", "surrogatepass")
            cfg_bytes = _mutate_text(p, base.decode("utf-8", "replace")).encode("utf-8", "surrogatepass")
        else:  # files: drop one, or empty one
            drop = p.pick(("config", "weights", "empty-weights", "empty-config"))
    raw = (header_text if header_text is not None else _dumps(header)).encode("utf-8", "surrogatepass")
    if length is None:
        n = len(raw)
    elif length < 0:
        n = max(0, len(raw) + length)
    else:
        n = length
    weights: bytes | None = struct.pack("<Q", n) + raw + bytes(body)
    config: bytes | None = (
        cfg_bytes if cfg_bytes is not None else _dumps(cfg).encode("utf-8", "surrogatepass")
    )
    if drop == "config":
        config = None
    elif drop == "weights":
        weights = None
    elif drop == "empty-weights":
        weights = b""
    elif drop == "empty-config":
        config = b""
    return config, weights


def weights_bytes(header: Mapping[str, Any] | str, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: u64 LE header length (default: the true one) + header JSON + data."""
    raw = (header if isinstance(header, str) else _dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _mutate_text(p: Provider, text: str) -> str:
    if not text:
        return p.chunk(16).decode("utf-8", "replace")
    at = p.below(len(text))
    how = p.below(3)
    ins = p.pick(('"', "{", "}", "[", "]", ",", ":", "0", "-", "9" * 30, "\\u0000", "NaN", " ", "\xff", "é"))
    if how == 0:
        return text[:at] + ins + text[at + 1 :]
    if how == 1:
        return text[:at] + ins + text[at:]
    return text[:at] + text[at + 1 + p.below(8) :]


def write_case(folder: Path, config: bytes | None, weights: bytes | None) -> None:
    for name, content in ((CONFIG_NAME, config), (WEIGHTS_NAME, weights)):
        path = folder / name
        if content is None:
            if path.exists():
                path.unlink()
        else:
            path.write_bytes(content)


def run_one(data: bytes, folder: Path) -> bool:
    """Run ``load_adapter`` on the adapter ``data`` decodes to. True: accepted, False: refused.

    Any exception other than ``AdapterValidationError`` propagates (that is the bug being hunted).
    """
    from vllm_safeguard.core.adapter_io import load_adapter
    from vllm_safeguard.errors import AdapterValidationError

    config, weights = mutate(data)
    write_case(folder, config, weights)
    try:
        load_adapter(folder, base_shapes=BASE_SHAPES)
    except AdapterValidationError:
        return False
    return True


# ------------------------------------------------------------------------------------- engines


def fuzz_random(
    seconds: float,
    *,
    seed: int = 0,
    max_len: int = 64,
    crash_dir: Path | None = None,
    keep_going: bool = False,
) -> tuple[int, int, list[tuple[bytes, str]]]:
    """Seeded random inputs for ``seconds``. Returns (executions, accepted, [(input, traceback)])."""
    rng = random.Random(seed)
    crashes: list[tuple[bytes, str]] = []
    execs = accepted = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-adapter-") as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = rng.randbytes(rng.randint(1, max_len))
            execs += 1
            try:
                accepted += run_one(data, folder)
            except Exception:
                tb = traceback.format_exc()
                crashes.append((data, tb))
                if crash_dir is not None:
                    crash_dir.mkdir(parents=True, exist_ok=True)
                    (crash_dir / f"crash-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
                if not keep_going:
                    break
            finally:
                # a mutation may have replaced a file by something else; start each case clean
                if not folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir()
    return execs, accepted, crashes


def fuzz_atheris(seconds: float, crash_dir: Path, extra: list[str]) -> None:  # pragma: no cover - standalone
    import atheris

    with atheris.instrument_imports(include=["vllm_safeguard"]):
        import vllm_safeguard.core.adapter_io  # noqa: F401

    tmp = tempfile.mkdtemp(prefix="fuzz-adapter-")
    folder = Path(tmp) / "adapter"
    folder.mkdir()
    count = [0]

    def test_one_input(data: bytes) -> None:
        count[0] += 1
        if count[0] % 10_000 == 0:
            print(f"executions: {count[0]}", flush=True)
        run_one(data, folder)

    # libFuzzer leaves with _exit (no atexit); its final "Done N runs" line is the total count.
    crash_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={int(seconds)}", f"-artifact_prefix={crash_dir}/", *extra]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fuzz vllm_safeguard.core.adapter_io.load_adapter")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    ap.add_argument("--seed", type=int, default=0, help="random engine seed")
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--keep-going", action="store_true", help="random engine: do not stop at the first crash")
    ap.add_argument("--replay", type=Path, default=None, help="run one saved input and show the result")
    ap.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags for atheris (after --)")
    args = ap.parse_args(argv)
    if args.replay is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            print(
                "accepted"
                if run_one(args.replay.read_bytes(), folder)
                else "refused (AdapterValidationError)"
            )
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        fuzz_atheris(args.seconds, args.crash_dir, args.libfuzzer_args)
        return 0
    t0 = time.monotonic()
    execs, accepted, crashes = fuzz_random(
        args.seconds, seed=args.seed, crash_dir=args.crash_dir, keep_going=args.keep_going
    )
    dt = time.monotonic() - t0
    print(
        f"executions: {execs} in {dt:.1f} s ({execs / dt:.0f}/s), "
        f"accepted: {accepted}, crashes: {len(crashes)}"
    )
    for data, tb in crashes[:5]:
        print(f"--- input {data.hex()}\n{tb}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
