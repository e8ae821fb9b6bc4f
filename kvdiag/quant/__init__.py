"""KV-cache storage formats behind one spec string: `get_quantizer("higgs:EDEN4-256:g128")`.

Every quantizer works row-wise along the last dim of x [..., n] (one row = one token's key or value
of one head, or of all KV heads):

    q = get_quantizer("higgs:EDEN4-256")      # HIGGS 2 bit/coord, Hadamard group 128
    qt = q.quantize(k_post)                   # codes + scales
    k_hat = q.dequantize(qt)                  # same shape and dtype as k_post
    q.roundtrip(k_post); q.bytes_per_row(128) # → 34.0 (32 B codes + one fp16 norm)

Specs (options after ':'):
    bf16, fp16                    plain casts
    fp8_e4m3[:row]                E4M3 saturating cast (the study's choice) [per-row absmax scale]
    nvfp4                         E2M1 in blocks of 16, E4M3 block scales, fp32 tensor scale
    int{k}[:g{G}]                 asymmetric min/max, k = 1..8 bits, group G (default the row)
    higgs:EDEN{d}-{n}[@clvq][:g{G}|:row]
                                  HIGGS on the study's published EDEN grid (or kvdiag's CLVQ
                                  rebuild with @clvq), Hadamard group G (power of two,
                                  default 128) or the whole row
`list_quantizers()` lists the ready-made specs with one line each.
"""

from __future__ import annotations

import math
import re

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.quant.base import QuantizedTensor, Quantizer, parse_group
from kvdiag.quant.floats import CastQuantizer, Fp8Quantizer, NvFp4Quantizer
from kvdiag.quant.grids import grid_info, grid_names, grid_shape, grid_source, load_grid
from kvdiag.quant.hadamard import is_power_of_two, walsh_hadamard
from kvdiag.quant.higgs import HiggsQuantizer
from kvdiag.quant.integer import IntQuantizer

__all__ = [
    "Quantizer",
    "QuantizedTensor",
    "get_quantizer",
    "list_quantizers",
    "walsh_hadamard",
    "load_grid",
    "grid_names",
    "grid_info",
    "CastQuantizer",
    "Fp8Quantizer",
    "NvFp4Quantizer",
    "IntQuantizer",
    "HiggsQuantizer",
]

DEFAULT_HIGGS_GROUP = 128
_INT = re.compile(r"^int(\d+)$")


def list_quantizers() -> dict[str, str]:
    """Ready-made specs → one-line description (every key is a valid `get_quantizer` spec)."""
    specs = {
        "bf16": "bfloat16 cast (16 bit)",
        "fp16": "float16 cast (16 bit)",
        "fp8_e4m3": "FP8 E4M3 saturating cast, no scale (8 bit; the study's offloaded K/V)",
        "fp8_e4m3:row": "FP8 E4M3 with a per-row absmax scale to 448 (8 bit + fp16 per row)",
        "nvfp4": "NVFP4: E2M1 in blocks of 16, E4M3 block scales, fp32 tensor scale (4.5 bit)",
        "int8": "8-bit asymmetric min/max per row (add :g<G> for groups of G)",
        "int4": "4-bit asymmetric min/max per row (add :g<G> for groups of G)",
        "int2": "2-bit asymmetric min/max per row (add :g<G> for groups of G)",
    }
    for name in grid_names():
        d, n = grid_shape(name)
        bits = math.log2(n) / d
        specs[f"higgs:{name}"] = (
            f"HIGGS on the {name} grid ({grid_source(name)}, {bits:g} bit/coord), Hadamard group 128 "
            "(or :g<G>, :row)"
        )
    return specs


def get_quantizer(spec: str) -> Quantizer:
    """Build the quantizer for a spec string (see the module docstring); clear errors otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvdiagError(f"quantizer spec must be a non-empty string, got {spec!r}")
    head, *opts = spec.strip().split(":")
    head = head.lower()
    if head in ("bf16", "fp16"):
        _no_options(spec, opts)
        return CastQuantizer(head)
    if head == "fp8_e4m3":
        if opts not in ([], ["row"]):
            raise KvdiagError(f"bad options in quantizer spec {spec!r}: fp8_e4m3 takes only ':row'")
        return Fp8Quantizer(row_scale=bool(opts))
    if head == "nvfp4":
        _no_options(spec, opts)
        return NvFp4Quantizer()
    if m := _INT.match(head):
        if len(opts) > 1:
            raise KvdiagError(f"bad options in quantizer spec {spec!r}: int{{k}} takes one ':g<G>' or ':row'")
        group = parse_group(opts[0], spec) if opts else None
        return IntQuantizer(bits=int(m.group(1)), group=group)
    if head == "higgs":
        return _higgs(spec, opts)
    raise unknown_name_error("quantizer", spec, list_quantizers())


def _higgs(spec: str, opts: list[str]) -> HiggsQuantizer:
    if not opts:
        raise KvdiagError(
            f"quantizer spec {spec!r} needs a grid, e.g. 'higgs:EDEN4-256'; grids: {', '.join(grid_names())}"
        )
    base, at, source = opts[0].partition("@")
    grid = base.upper() + (at + source.lower() if at else "")
    grid_shape(grid)  # "did you mean" on unknown grids
    if len(opts) > 2:
        raise KvdiagError(
            f"bad options in quantizer spec {spec!r}: higgs takes a grid and one ':g<G>' or ':row'"
        )
    group = parse_group(opts[1], spec) if len(opts) == 2 else DEFAULT_HIGGS_GROUP
    if group is not None and not is_power_of_two(group):
        raise KvdiagError(f"HIGGS Hadamard group must be a power of two, got {group} in {spec!r}")
    return HiggsQuantizer(grid=grid, group=group)


def _no_options(spec: str, opts: list[str]) -> None:
    if opts:
        raise KvdiagError(f"quantizer spec {spec!r} takes no options (got ':{':'.join(opts)}')")
