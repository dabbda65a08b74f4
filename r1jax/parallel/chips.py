"""Accelerator facts for the dry run's step-time model: published spec-sheet numbers, one row a
chip. Nothing here is measured; `r1jax.train.step_time` turns a compiled step's FLOPs, HBM bytes
and collective bytes into a roofline over these.

Conventions (the same for every row):
  peak_flops     dense bf16 matmul FLOP/s per chip (no 2:4 sparsity; TPU7x's 4614 TFLOP/s is FP8,
                 its bf16 peak is half of it).
  hbm_bytes      HBM capacity per chip in bytes, as the vendor states it (GiB for TPUs, GB for GPUs).
  hbm_bw         HBM bandwidth per chip, bytes/s.
  link_bw        scale-up interconnect bandwidth per chip, bytes/s, BIDIRECTIONAL (in + out over
                 all its links): TPU ICI as Google's tables give it ("bidirectional ICI bandwidth
                 per chip"), NVLink as NVIDIA gives it ("900 GB/s" for H100 is 450 GB/s each way).
                 The step-time model divides the bytes a device *sends* by half of it
                 (`egress_bw`). For GPUs it is the NVLink domain (8 GPUs on HGX boards): a mesh of
                 256 GPUs crosses InfiniBand (~50 GB/s a GPU each way), which this ignores, so GPU
                 collective times here are optimistic beyond one node.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GiB = 1024**3
TERA = 1e12


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    link_bw: float  # bytes/s, bidirectional, per chip (ICI or NVLink)
    source: str
    unsure: str = ""  # which of the numbers above is least certain, and why

    @property
    def egress_bw(self) -> float:
        """Bytes/s one chip can send over its interconnect: half the bidirectional figure."""
        return self.link_bw / 2


CHIPS: dict[str, Chip] = {c.name: c for c in (
    # Google Cloud TPU v5e page: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GBps, bidirectional ICI
    # 400 GBps per chip (older page: "Interchip Interconnect BW 1600 Gbps" = 200 GB/s each way).
    Chip("v5e", 197 * TERA, 16 * GiB, 819 * GB, 400 * GB, "cloud.google.com/tpu/docs/v5e (published spec)",
         "HBM capacity: the page says 16 GB; taken as GiB like the other TPU rows"),
    # TPU v5p page and the TPU7x comparison table: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GBps,
    # bidirectional ICI 1200 GBps per chip (= the older "4800 Gbps" one way).
    Chip("v5p", 459 * TERA, 95 * GiB, 2765 * GB, 1200 * GB, "cloud.google.com/tpu/docs/v5p (published spec)"),
    # TPU v6e (Trillium) page: 918 TFLOP/s bf16, 32 GB HBM at 1638 GBps, bidirectional ICI 800 GBps
    # per chip (an older page gave 3584 Gbps, 448 GB/s one way; the newer figure is used).
    Chip("v6e", 918 * TERA, 32 * GiB, 1638 * GB, 800 * GB, "cloud.google.com/tpu/docs/v6e (published spec)",
         "ICI: two published figures (800 GBps bidirectional vs 3584 Gbps); the lower one is used"),
    # TPU7x (Ironwood) comparison table: 2307 TFLOP/s bf16 (4614 is FP8), 192 GiB HBM at 7380 GBps,
    # bidirectional ICI 1200 GBps per chip. One chip is two TensorCores (two JAX devices on some
    # set-ups); these are per chip.
    Chip("ironwood", 2307 * TERA, 192 * GiB, 7380 * GB, 1200 * GB, "cloud.google.com/tpu/docs/tpu7x (published spec)",
         "a chip may show up as two JAX devices (dual chiplet): the dry run's devices are chips here"),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 80 GB HBM3 at
    # 3.35 TB/s, NVLink 4 900 GB/s total per GPU.
    Chip("h100", 989 * TERA, 80 * GB, 3350 * GB, 900 * GB, "NVIDIA H100 SXM datasheet (published spec)"),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    Chip("h200", 989 * TERA, 141 * GB, 4800 * GB, 900 * GB, "NVIDIA H200 SXM datasheet (published spec)"),
    # NVIDIA HGX B200 (1000 W): 2.25 PFLOP/s dense bf16 (4.5 with sparsity), 180 GB HBM3e per GPU
    # (1.44 TB per 8-GPU board; the die carries 192 GB), 8 TB/s, NVLink 5 1.8 TB/s total per GPU.
    Chip("b200", 2250 * TERA, 180 * GB, 8000 * GB, 1800 * GB, "NVIDIA HGX B200 datasheet (published spec)",
         "peak: 2.25 PFLOP/s is the 1000 W HGX part (GB200's runs 2.5); HBM 180 vs 192 GB by source"),
)}


def get_chip(name: str) -> Chip:
    key = name.lower().replace("tpu7x", "ironwood").replace("tpu", "").strip("-_ ")
    if key not in CHIPS:
        raise KeyError(f"unknown chip {name!r} (known: {', '.join(CHIPS)})")
    return CHIPS[key]


# `jax.Device.device_kind` substrings -> rows, most specific first ("TPU v5 lite" is a v5e, "TPU v5"
# a v5p). PCIe and NVL H100s have lower clocks than the SXM part of the h100 row: no match.
_DEVICE_KINDS = (("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v5p", "v5p"), ("tpu v5", "v5p"),
                 ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"), ("tpu7x", "ironwood"), ("ironwood", "ironwood"),
                 ("h100 pcie", None), ("h100 nvl", None), ("h100", "h100"), ("h200", "h200"), ("b200", "b200"))


def chip_for_device(device_kind: str) -> Chip | None:
    """The row of a JAX device's `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None
    for a device not in the table (CPUs, older or other chips)."""
    kind = device_kind.lower()
    for needle, name in _DEVICE_KINDS:
        if needle in kind:
            return CHIPS[name] if name else None
    return None
