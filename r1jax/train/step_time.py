"""A step-time model for a compiled train step: what one device does per step, read from the
optimized HLO, over the spec-sheet facts of a chip (`r1jax.parallel.chips`).

    costs = hlo_costs(compiled.as_text())        # matmul FLOPs, HBM bytes, collective bytes / device
    t = predict(costs, CHIPS["v5p"], model_flops=train_flops(cfg.model, b, t) / devices, tokens=b * t / devices)

Why not `compiled.cost_analysis()`: XLA's cost analysis counts a while loop's body once, and the
layers run in a `lax.scan` (a while loop of trip count L), so it misses (L-1)/L of the model. The
walk here multiplies every computation by the trip counts of the loops around it
(`known_trip_count` in the while op's backend config; a loop without one counts once and is
listed in `HloCosts.unknown_loops`). On a loop-free program the two agree (tests).

What is counted, per device, per step:
  flops       2·M·N·K of every `dot` (inside fusions too): matmul work only, elementwise ops
              are left out (they run on the vector units, beside the matrix units).
  hbm_bytes   operands + results of every top-level op and fusion (a fusion's internals stay
              on chip), as XLA's cost analysis counts them; a stacked-layer array that a fusion
              only `dynamic-slice`s counts the slice, an in-place `dynamic-update-slice` the update.
  collective  bytes each device SENDS, by kind, ring algorithms over a group of n devices:
                all-gather      result bytes x (n-1)/n
                reduce-scatter  operand bytes x (n-1)/n   (= result x (n-1))
                all-reduce      2 x bytes x (n-1)/n       (reduce-scatter then all-gather)
                all-to-all      bytes x (n-1)/n           (keeps 1/n of its buffer)
                collective-permute  result bytes, if the device sends to another one
              XLA:CPU has no bf16 collectives: it converts bf16 operands to f32 around them.
              A leaf the walk sees converted from (or straight back to) bf16 counts at bf16,
              as a TPU or GPU would move it; others it cannot trace stay at f32 (an upper estimate).
  kernels     a Pallas kernel compiled in interpret mode (splash attention in the dry run) is a
              while loop over its grid whose body copies whole buffers in and out of simulated
              on-chip memory: its matmul FLOPs are counted as above, but its HBM bytes as one
              op's, every buffer it carries read or written once (`HloCosts.kernels` counts
              them). A lower estimate: the real kernel streams K and V once per query block.

The model (`predict`): a roofline. t_lower = max(flops / peak, hbm_bytes / hbm_bw, collective /
egress_bw), every unit busy all the time and perfectly overlapped; t_serial = their sum, nothing
overlapped. MFU upper bound = model FLOPs / (peak x t_lower). The HLO is XLA:CPU's: its fusion
decisions (fewer, smaller fusions than TPU's) inflate `hbm_bytes`, and the CPU stand-in for
`dropless` dispatch (capacity = every token) inflates expert FLOPs; the README says by how much.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from r1jax.config import ModelConfig
from r1jax.model.summary import attention_flops_per_token, matmul_params_per_token
from r1jax.parallel.chips import Chip

# The grid loop of a Pallas kernel lowered in interpret mode, known by its op name.
_KERNEL_LOOP = re.compile(r'op_name="[^"]*/(splash_mha_\w+|pallas_call)[/"]')
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Ops that move no HBM bytes of their own (aliases, tuples, control flow counted through its body).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "while", "call", "conditional", "opt-barrier", "add-dependency"}


# ----------------------------------------------------------------------------- HLO text


def _bits(dtype: str) -> int:
    if dtype == "pred" or dtype.startswith("f8"):
        return 8
    if dtype in ("token", "tuple"):
        return 0
    digits = re.search(r"\d+", dtype)
    return int(digits.group()) if digits else 0


_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array shape in an HLO type (a tuple's leaves in order): [(dtype, dims)]."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)]


def _nbytes(type_str: str) -> int:
    return sum(math.prod(dims) * _bits(dt) // 8 for dt, dims in _arrays(type_str))


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] ( '(' or '{' )."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, want = 0, []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            want.append(pairs[c])
            depth += 1
        elif want and c == want[-1]:
            want.pop()
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the text inside the op's parentheses (a parameter's index)
    root: bool = False


_HEADER = re.compile(r"^(ENTRY )?%?(\S+) \(.*\) -> .*\{$")
_LHS = re.compile(r"^\s*(ROOT )?%?([^\s=]+) = ")


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str, int]:
    """Optimized HLO text -> ({computation: [instructions]}, entry name, num_partitions)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    parts = re.search(r"num_partitions=(\d+)", text)
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            current = comps.setdefault(head.group(2), [])
            if head.group(1):
                entry = head.group(2)
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        lhs = _LHS.match(line)
        if not lhs:
            continue
        rest = line[lhs.end():]
        end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
        type_str, rest = rest[:end], rest[end:].lstrip()
        op = re.match(r"([\w\-.]+)\(", rest)
        if not op:
            continue
        close = _closing(rest, op.end() - 1)
        args = rest[op.end(): close - 1]
        operands = re.findall(r"%([^\s,()]+)", args)
        current.append(Instr(lhs.group(2), type_str, op.group(1), operands, rest[close:], args, bool(lhs.group(1))))
    return comps, entry, int(parts.group(1)) if parts else 1


def group_size(attrs: str, num_partitions: int) -> int:
    """Devices in each replica group of a collective: explicit groups {{0,1},{2,3}}, iota groups
    [G,S]<=[...], or mesh groups mesh['axis_0'=4,'axis_1'=2] {'axis_0'} (the listed axes)."""
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        tail = re.match(r"(?:, device_ids=\(\[[\d,]*\](?:T\([\d,]*\))?\))? \{([^}]*)\}", attrs[m.end():])
        if not tail:
            return math.prod(sizes.values())
        n = 1
        for axis, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", tail.group(1)):
            n *= int(sub) if sub else sizes.get(axis, 1)
        return n
    return num_partitions


def collective_bytes(ins: Instr, kind: str, types: dict[str, str], num_partitions: int) -> float:
    """Bytes one device sends for one collective (the formulas of the module docstring)."""
    out = _nbytes(ins.type)
    if kind == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", ins.attrs.split("source_target_pairs=", 1)[-1])
        moving = sum(a != b for a, b in pairs)
        return out * moving / len(pairs) if pairs else 0.0
    n = group_size(ins.attrs, num_partitions)
    if n <= 1:
        return 0.0
    if kind == "reduce-scatter":
        return sum(_nbytes(types.get(o, "")) for o in ins.operands) * (n - 1) / n
    if kind == "all-reduce":
        return 2.0 * out * (n - 1) / n
    return out * (n - 1) / n  # all-gather (result), all-to-all (buffer)


# ----------------------------------------------------------------------------- costs


@dataclass
class HloCosts:
    flops: float = 0.0  # matmul FLOPs per device per step
    hbm_bytes: float = 0.0  # per device per step
    collectives: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in COLLECTIVES})  # bytes sent
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COLLECTIVES})  # ops executed
    loops: list[int] = field(default_factory=list)  # trip counts of the while loops met
    unknown_loops: int = 0  # while loops without a known trip count (counted once)
    kernels: int = 0  # interpret-mode Pallas kernel runs (their grid loops), bytes counted as one op

    @property
    def collective_bytes(self) -> float:
        return sum(self.collectives.values())


class _Walker:
    def __init__(self, text: str):
        self.comps, self.entry, self.parts = parse_hlo(text)
        self.types = {c: {i.name: i.type for i in ins} for c, ins in self.comps.items()}
        self.defs = {c: {i.name: i for i in ins} for c, ins in self.comps.items()}
        self.users: dict[str, dict[str, list[Instr]]] = {}
        for c, body in self.comps.items():
            uses = self.users.setdefault(c, {})
            for i in body:
                for o in i.operands:
                    uses.setdefault(o, []).append(i)
        self.costs = HloCosts()
        self._dot_cache: dict[str, float] = {}

    def _root(self, fused: str) -> Instr | None:
        return next((i for i in self.comps.get(fused, []) if i.root), None)

    def _converted_from_bf16(self, name: str, comp: str) -> bool:
        """Is value `name` of `comp` an f32 convert of a bf16 value (a convert, or a fusion
        whose result is one)?"""
        ins = self.defs[comp].get(name)
        if ins is None:
            return False
        if ins.opcode == "fusion":
            fused = _called(ins.attrs, "calls")
            root = self._root(fused)
            return root is not None and root.opcode == "convert" and "bf16" in self.types[fused].get(root.operands[0], "")
        return ins.opcode == "convert" and "bf16" in self.types[comp].get(ins.operands[0], "")

    def promoted_bf16(self, ins: Instr, comp: str) -> float:
        """The fraction of a collective's bytes that the program moved in bf16 but XLA:CPU moves
        in f32: it has no bf16 collectives (nor bf16 dots), so it converts around them. A leaf
        counts when its operand was converted from bf16, or when every use of it converts
        straight back to bf16. A TPU or GPU moves those leaves at half the bytes."""
        leaves = _arrays(ins.type)
        if not leaves or not ins.operands:
            return 0.0
        users = self.users[comp].get(ins.name, [])
        if ins.type.startswith("("):
            by_index = {}
            for u in users:
                if u.opcode == "get-tuple-element":
                    idx = re.search(r"index=(\d+)", u.attrs)
                    by_index.setdefault(int(idx.group(1)) if idx else -1, []).extend(self.users[comp].get(u.name, []))
        else:
            by_index = {0: users}
        total = promoted = 0.0
        for i, (dt, dims) in enumerate(leaves):
            size = math.prod(dims) * _bits(dt) / 8
            total += size
            if dt != "f32":
                continue
            operand = ins.operands[i] if i < len(ins.operands) else None
            uses = by_index.get(i, [])
            if (operand and self._converted_from_bf16(operand, comp)) or (uses and all(map(self._converts_to_bf16, uses))):
                promoted += size
        return promoted / total if total else 0.0

    def _converts_to_bf16(self, user: Instr) -> bool:
        """A plain convert to bf16, or a fusion that is nothing else (parameter, bitcast, convert)."""
        if user.opcode == "convert":
            return user.type.startswith("bf16")
        if user.opcode != "fusion":
            return False
        body = self.comps.get(_called(user.attrs, "calls"), [])
        root = next((i for i in body if i.root), None)
        return (root is not None and root.opcode == "convert" and root.type.startswith("bf16")
                and all(i.opcode in ("parameter", "bitcast", "convert") for i in body))

    def dot_flops(self, ins: Instr, comp: str) -> float:
        out = _arrays(ins.type)
        lhs = _arrays(self.types[comp].get(ins.operands[0], "")) if ins.operands else []
        if not out or not lhs:
            return 0.0
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        dims = [int(d) for d in m.group(1).split(",") if d] if m else []
        k = math.prod(lhs[0][1][d] for d in dims)
        return 2.0 * math.prod(out[0][1]) * k

    def fused_flops(self, comp: str) -> float:
        """Matmul FLOPs of a fused computation (nested fusions included), cached."""
        if comp not in self._dot_cache:
            total = 0.0
            for ins in self.comps.get(comp, []):
                if ins.opcode == "dot":
                    total += self.dot_flops(ins, comp)
                elif ins.opcode == "fusion":
                    total += self.fused_flops(_called(ins.attrs, "calls"))
            self._dot_cache[comp] = total
        return self._dot_cache[comp]

    def fusion_bytes(self, ins: Instr, comp: str) -> float:
        """HBM bytes of one fusion: its operands and result, less what it only slices or
        updates in place."""
        fused = _called(ins.attrs, "calls")
        body = self.comps.get(fused, [])
        users: dict[str, list[tuple[Instr, int]]] = {}
        param_of: dict[int, str] = {}
        for i in body:
            if i.opcode == "parameter":
                param_of[int(i.args)] = i.name
            for pos, o in enumerate(i.operands):
                users.setdefault(o, []).append((i, pos))
        total = 0.0
        for pos, operand in enumerate(ins.operands):
            full = _nbytes(self.types[comp].get(operand, ""))
            name = param_of.get(pos)
            total += full if name is None else min(full, _read_bytes(name, users, full))
        root = next((i for i in body if i.root), None)
        total += _written_bytes(ins.type, root, {i.name: i for i in body}, self.types.get(fused, {}))
        return total

    def op_bytes(self, ins: Instr, comp: str) -> float:
        types = self.types[comp]
        if ins.opcode == "dynamic-slice":
            return 2.0 * _nbytes(ins.type)
        if ins.opcode == "dynamic-update-slice":
            return 2.0 * _nbytes(types.get(ins.operands[1], "")) if len(ins.operands) > 1 else 0.0
        if ins.opcode == "gather":
            return 2.0 * _nbytes(ins.type) + _nbytes(types.get(ins.operands[1], "")) if len(ins.operands) > 1 else 0.0
        if ins.opcode == "scatter":
            return sum(2.0 * _nbytes(types.get(o, "")) for o in ins.operands[1:])
        return _nbytes(ins.type) + sum(_nbytes(types.get(o, "")) for o in ins.operands)

    def walk(self, comp: str, mult: float) -> None:
        c = self.costs
        for ins in self.comps.get(comp, []):
            op = ins.opcode
            kind = op.removesuffix("-start")
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
                n = int(trip.group(1)) if trip else 1
                c.loops.append(n)
                c.unknown_loops += trip is None
                if _KERNEL_LOOP.search(ins.attrs):
                    hbm = c.hbm_bytes
                    self.walk(_called(ins.attrs, "body"), mult * n)
                    c.hbm_bytes = hbm + mult * _nbytes(ins.type)
                    c.kernels += int(mult)
                    continue
                self.walk(_called(ins.attrs, "body"), mult * n)
            elif op == "call":
                self.walk(_called(ins.attrs, "to_apply"), mult)
            elif op == "conditional":
                branches = re.findall(r"%([^\s,{}]+)", ins.attrs.split("branch_computations=", 1)[-1].split("}", 1)[0])
                branches = branches or [_called(ins.attrs, "true_computation"), _called(ins.attrs, "false_computation")]
                for b in branches:  # the average branch
                    self.walk(b, mult / len(branches))
            elif kind in COLLECTIVES:
                moved = collective_bytes(ins, kind, self.types[comp], self.parts)
                moved *= 1 - self.promoted_bf16(ins, comp) / 2
                c.collectives[kind] += mult * moved
                c.counts[kind] += int(mult)
            elif op.endswith("-done") or op in _FREE:
                continue
            elif op == "fusion":
                c.flops += mult * self.fused_flops(_called(ins.attrs, "calls"))
                c.hbm_bytes += mult * self.fusion_bytes(ins, comp)
            else:
                if op == "dot":
                    c.flops += mult * self.dot_flops(ins, comp)
                c.hbm_bytes += mult * self.op_bytes(ins, comp)


def _called(attrs: str, key: str) -> str:
    m = re.search(key + r"=%?([^\s,{}]+)", attrs)
    return m.group(1) if m else ""


def _read_bytes(name: str, users: dict, full: int) -> float:
    """HBM bytes a fused computation reads of its parameter `name`: the slices when every use is
    a (dynamic-)slice or gather of it, nothing when it is only the buffer of an in-place
    dynamic-update-slice, else the whole array (bitcasts followed through)."""
    total = 0.0
    for user, pos in users.get(name, []):
        if user.opcode == "bitcast":
            total += _read_bytes(user.name, users, full)
        elif user.opcode in ("dynamic-slice", "slice", "gather") and pos == 0:
            total += _nbytes(user.type)
        elif user.opcode == "dynamic-update-slice" and pos == 0:
            continue
        else:
            return full
    return total


def _written_bytes(type_str: str, root: Instr | None, by_name: dict, types: dict) -> float:
    """HBM bytes a fusion writes: its result, except that an in-place dynamic-update-slice
    writes only its update (per tuple element)."""
    if root is None:
        return _nbytes(type_str)
    if root.opcode == "tuple":
        return sum(_written_bytes(by_name[o].type, by_name.get(o), by_name, types) if o in by_name else 0
                   for o in root.operands)
    if root.opcode == "bitcast" and root.operands and root.operands[0] in by_name:
        return _written_bytes(root.type, by_name[root.operands[0]], by_name, types)
    if root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        return _nbytes(types.get(root.operands[1], ""))
    return _nbytes(root.type)


def hlo_costs(text: str) -> HloCosts:
    """Per-device costs of one run of the optimized, SPMD-partitioned HLO `text`
    (`compiled.as_text()`), loops multiplied out."""
    walker = _Walker(text)
    walker.walk(walker.entry, 1.0)
    return walker.costs


# ----------------------------------------------------------------------------- analytic count


def train_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, computed: bool = False) -> float:
    """FLOPs of one training step over all devices: 6·N·tokens + 3 x attention (forward once,
    backward twice), N = `matmul_params_per_token`. No rematerialisation counted (model FLOPs)."""
    tokens = batch_size * seq_len
    per_token = 6.0 * matmul_params_per_token(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len, computed=computed)
    return per_token * tokens


# ----------------------------------------------------------------------------- the model


@dataclass
class StepTime:
    chip: str
    compute_s: float  # matmul FLOPs / peak
    hbm_s: float  # HBM bytes / HBM bandwidth
    collective_s: float  # bytes sent / egress bandwidth
    tokens_per_device: float
    model_flops_per_device: float
    peak_flops: float
    fits: bool | None = None  # peak memory within the chip's HBM (None: not known)

    @property
    def lower_s(self) -> float:
        """Roofline lower bound: all three overlap perfectly."""
        return max(self.compute_s, self.hbm_s, self.collective_s)

    @property
    def serial_s(self) -> float:
        """Nothing overlaps: an upper-ish estimate (latencies and idle bubbles still left out)."""
        return self.compute_s + self.hbm_s + self.collective_s

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.hbm_s, "HBM"), (self.collective_s, "collectives"))[1]

    @property
    def mfu_upper(self) -> float:
        return self.model_flops_per_device / (self.peak_flops * self.lower_s)

    @property
    def tokens_per_s(self) -> float:
        """Per chip, at the lower-bound step time."""
        return self.tokens_per_device / self.lower_s


def predict(costs: HloCosts, chip: Chip, *, model_flops: float, tokens: float, peak_bytes: float | None = None) -> StepTime:
    """The roofline of `costs` on `chip`; model_flops and tokens are per device per step."""
    return StepTime(chip.name, costs.flops / chip.peak_flops, costs.hbm_bytes / chip.hbm_bw,
                    costs.collective_bytes / chip.egress_bw, tokens, model_flops, chip.peak_flops,
                    None if peak_bytes is None else peak_bytes <= chip.hbm_bytes)


def _ms(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:,.0f} us"
    return f"{s * 1e3:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def chip_table(times: list[StepTime]) -> str:
    head = (f"  {'chip':<9}{'compute':>10}{'HBM':>10}{'collect.':>10}{'lower bound':>13}{'no overlap':>12}"
            f"{'bound by':>13}{'tok/s/chip':>12}{'MFU <=':>8}{'fits':>6}")
    rows = [head]
    for t in times:
        fits = "?" if t.fits is None else ("yes" if t.fits else "no")
        rows.append(f"  {t.chip:<9}{_ms(t.compute_s):>10}{_ms(t.hbm_s):>10}{_ms(t.collective_s):>10}"
                    f"{_ms(t.lower_s):>13}{_ms(t.serial_s):>12}{t.bound:>13}{t.tokens_per_s:>12,.0f}"
                    f"{t.mfu_upper * 100:>7.1f}%{fits:>6}")
    return "\n".join(rows)


def costs_table(costs: HloCosts, model_flops: float) -> str:
    GiB = 1024**3
    loops = ", ".join(str(n) for n in sorted(set(costs.loops))) or "none"
    rows = [("matmul FLOPs / device", f"{costs.flops:.3e} ({costs.flops / model_flops:.2f}x the model's {model_flops:.3e})"),
            ("HBM bytes / device", f"{costs.hbm_bytes / GiB:,.1f} GiB"),
            ("collective bytes sent", f"{costs.collective_bytes / GiB:,.2f} GiB")]
    for k in COLLECTIVES:
        if costs.counts[k]:
            rows.append((f"  {k}", f"{costs.collectives[k] / GiB:,.2f} GiB in {costs.counts[k]:,} ops"))
    rows.append(("while-loop trip counts", loops + (f" ({costs.unknown_loops} unknown, counted once)" if costs.unknown_loops else "")))
    return "\n".join(f"  {k:<28}{v}" for k, v in rows)
