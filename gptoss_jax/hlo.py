"""What a lowered program multiplies, read from its StableHLO (`lowered.as_text(debug_info=True)`) as the
XLA of the platform it is lowered for compiles each op: every matmul with its FLOPs on one device, the name
scope it was traced under, and whether it sits inside a shard_map (shapes per device) or a loop.

How each op is counted:
- `stablehlo.dot_general`: 2 x (result elements) x (contracted elements), on every platform.
- `chlo.ragged_dot` (jax.lax.ragged_dot): on CUDA, ROCm and CPU, XLA's RaggedDotRewriter
  (openxla xla/hlo/transforms/expanders/ragged_dot_rewriter.cc, RaggedToDense / RaggedToGeneral) turns it into
  an ordinary dot over every group, the ragged operand broadcast once per group and masked: the FLOPs of a
  dot_general times the number of groups. The exception, a cuDNN fusion taken only when the process sets
  `--xla_gpu_experimental_use_ragged_dot_fusion` (and a recent cuDNN on Ampere or newer), is not a property
  of the program: `ragged_dot_fusion=True` counts it as grouped. On TPU the compiler is not open source, so a
  ragged_dot is left uncounted (`flops` None) rather than guessed.
- `stablehlo.custom_call @tpu_custom_call` (a Pallas kernel compiled by Mosaic): the FLOPs of the cost estimate
  the kernel declares (`cost_estimate` in its backend_config), and none where it declares none. For megablox's
  grouped matmuls (gmm, tgmm: recognised by their scalar-prefetch operands, the group offsets [G + 1] and the
  tiles' group and row ids [T]) the estimate counts the rows once (2 m k n); their grid visits T tiles, m / tm
  plus one more for each group boundary inside a tile (T = m / tm + G - 1), so they count T / (m / tm) times it.
- Outside any shard_map a program's shapes are global: its FLOPs are divided by the devices (the best any
  partitioning can do); inside one (`sdy.manual_computation`) they are one device's already.
- Inside a `stablehlo.while` whose condition compares its counter with a constant (lax.scan, lax.map), an op
  runs that many times; a loop bounded by a computed value (the dropless expert loop) leaves its ops'
  count unknown.
"""

from __future__ import annotations

import dataclasses
import math
import re

_LOC = re.compile(r"^#loc(\d+) = loc\((.*)\)\s*$")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_OP_LOC = re.compile(r"loc\(#loc(\d+)\)\s*$")


@dataclasses.dataclass(frozen=True)
class Matmul:
  op: str  # dot_general | ragged_dot | tpu_custom_call
  flops: float | None  # on one device, as the platform's XLA computes it (None: not known, see the module)
  names: tuple[str, ...]  # the op's name-scope paths (jit(f)/.../experts/dot_general)
  manual: bool  # inside a shard_map: its shapes are one device's
  trips: int | None  # times it runs: the product of its loops' trip counts (flops include it); None where a
  # loop's count is not a constant of the program (a fori_loop over a traced bound: the routing decides)
  result: tuple[int, ...]

  def under(self, scope: str) -> bool:
    """Traced under name scope `scope` (a path component, also inside a transformation's parentheses:
    jit(f)/transpose(jvp(experts))/dot_general)."""
    return any(re.search(rf"(^|[/(]){re.escape(scope)}([/)]|$)", name) for name in self.names)


def _dims(tensor_type: str) -> tuple[int, ...]:
  return tuple(int(d) for d in tensor_type.split("x")[:-1])


def _numbers(text: str, key: str) -> list[int]:
  match = re.search(rf"{key} = \[([\d, ]*)\]", text)
  return [int(d) for d in match.group(1).split(",") if d.strip()] if match else []


def _names(locs: dict[str, str], loc_id: str, seen=None) -> set[str]:
  """The name-scope strings a location resolves to (through callsites and nested locations)."""
  seen = set() if seen is None else seen
  if loc_id in seen or loc_id not in locs:
    return set()
  seen.add(loc_id)
  body = locs[loc_id]
  names = {s for s in re.findall(r'"([^"]*)"(?!:\d)', body) if "/" in s}
  for ref in re.findall(r"#loc(\d+)", body):
    names |= _names(locs, ref, seen)
  return names


def _flops(line: str, op: str, platform: str, ragged_dot_fusion: bool) -> tuple[float | None, tuple[int, ...]]:
  operands, result = line.rsplit("->", 1)
  shapes = [_dims(t) for t in _TENSOR.findall(operands)]
  out = _dims(_TENSOR.findall(result)[0])
  if op == "dot_general":
    contract = re.search(r"contracting_dims = \[([\d, ]*)\] x", line)
    lhs_contracting = [int(d) for d in contract.group(1).split(",") if d.strip()] if contract else []
    return 2.0 * math.prod(out) * math.prod(shapes[0][d] for d in lhs_contracting), out
  contracted = math.prod(shapes[0][d] for d in _numbers(line, "lhs_contracting_dimensions"))
  grouped = 2.0 * math.prod(out) * contracted
  if platform == "tpu":
    return None, out
  groups = shapes[2][-1] if _numbers(line, "rhs_group_dimensions") else 1
  return (grouped if ragged_dot_fusion and platform == "cuda" else grouped * groups), out


_MEGABLOX = re.compile(r"\(tensor<i32>, tensor<(\d+)xi32>, tensor<(\d+)xi32>, tensor<\2xi32>, tensor<1xi32>,")


def _kernel_flops(line: str) -> float | None:
  """A Pallas TPU kernel's FLOPs: its declared cost estimate, scaled to its grid's bound for megablox's."""
  declared = re.search(r"\\22flops\\22:(\d+)", line)
  if not declared:
    return None
  flops = float(declared.group(1))
  if megablox := _MEGABLOX.search(line.rsplit("} : ", 1)[-1]):
    groups, tiles = int(megablox.group(1)) - 1, int(megablox.group(2))
    flops *= tiles / (tiles - groups + 1)
  return flops


def _functions(text: str) -> dict[str, list[str]]:
  """Each function of the module (`func.func ... @name(`) -> the lines of its body."""
  functions, name, depth = {}, None, 0
  for line in text.splitlines():
    if name is None:
      if match := re.search(r"func\.func (?:public |private )?@([\w.$-]+)\(", line):
        name, depth = match.group(1), line.count("{") - line.count("}")
        functions[name] = []
      continue
    depth += line.count("{") - line.count("}")
    if depth <= 0:
      name = None
    else:
      functions[name].append(line)
  return functions


def matmuls(text: str, platform: str, devices: int = 1, ragged_dot_fusion: bool = False) -> list[Matmul]:
  """Every matmul of a program's StableHLO text lowered for `platform` (cpu | cuda | rocm | tpu) over
  `devices` devices, once per call of the function holding it (a called function's matmuls take the call's
  name scopes, shard_map and loops)."""
  locs = {m.group(1): m.group(2) for line in text.splitlines() if (m := _LOC.match(line))}
  functions, found = _functions(text), []

  def names(line: str) -> set[str]:
    loc = _OP_LOC.search(line)
    return _names(locs, loc.group(1)) if loc else set()

  def walk(function: str, outer: frozenset, manual: bool, trips: int | None):
    regions, depth = [], 0  # [kind, depth at its op, entered, trips (while), in its condition (while)]
    constants = {}
    for line in functions[function]:
      if "sdy.manual_computation(" in line:
        regions.append(["manual", depth, False, 1, False])
      elif "stablehlo.while" in line:
        regions.append(["while", depth, False, None, True])
      if regions and regions[-1][4]:  # a while's condition: `counter < constant` gives its trip count
        if match := re.search(r"(%\w+) = stablehlo\.constant dense<(\d+)> : tensor<i32>", line):
          constants[match.group(1)] = int(match.group(2))
        if match := re.search(r"stablehlo\.compare\s+LT, %iterArg\w*, (%\w+)", line):
          regions[-1][3] = constants.get(match.group(1))
        if "} do {" in line:
          regions[-1][4] = False
      inside_manual = manual or any(r[0] == "manual" for r in regions)
      inside_trips = trips
      for r in regions:
        inside_trips = None if inside_trips is None or r[3] is None else inside_trips * r[3]
      if call := re.search(r"\bcall @([\w.$-]+)\(", line):
        walk(call.group(1), outer | names(line), inside_manual, inside_trips)
      op = ("dot_general" if "stablehlo.dot_general" in line else "ragged_dot" if "chlo.ragged_dot" in line else
            "tpu_custom_call" if "custom_call @tpu_custom_call(" in line else None)
      if op:
        flops, out = (_kernel_flops(line), _dims(_TENSOR.findall(line.rsplit("->", 1)[1])[0])) \
            if op == "tpu_custom_call" else _flops(line, op, platform, ragged_dot_fusion)
        if flops is not None:
          flops = (flops if inside_manual else flops / devices) * (inside_trips or 1)
        found.append(Matmul(op, flops, tuple(sorted(outer | names(line))), inside_manual, inside_trips, out))
      depth += line.count("{") - line.count("}")
      for region in regions:
        region[2] = region[2] or depth > region[1]
      while regions and regions[-1][2] and depth <= regions[-1][1]:
        regions.pop()

  walk("main", frozenset(), False, 1)
  return found


def scope_flops(text: str, scope: str, platform: str, devices: int = 1, ragged_dot_fusion: bool = False) -> float:
  """One device's FLOPs of the matmuls traced under name scope `scope`; an error where some cannot be counted
  from the text (in a loop whose trip count the routing decides, or a platform whose XLA is not open source)."""
  ops = [m for m in matmuls(text, platform, devices, ragged_dot_fusion) if m.under(scope)]
  unknown = [m for m in ops if m.flops is None or m.trips is None]
  if unknown:
    raise ValueError(f"{len(unknown)} matmul(s) under {scope!r} cannot be counted from the text "
                     f"({unknown[0].op}, {'in a loop' if unknown[0].trips is None else platform})")
  return sum(m.flops for m in ops)
