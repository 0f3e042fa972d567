"""Weights that already lie on a 4-bit grid (a model dequantized from a Q4_0/Q4_1/Q4_K GGUF) are stored on that
grid exactly instead of being quantized a second time.

Such a block of 32 holds at most 16 values `offset + scale * q`, q in 0..15, with a float offset. MatMulNBits'
fast kernels take integer zero points only, so a second 4-bit rounding would put a misaligned grid over the first
and add its noise twice. Written exactly instead:

    x @ W = MatMulNBits(x; q, scale, zero point 0) + blocksum(x) @ offset

where blocksum(x) sums x over each block of K. The extra term reads one float per block and column.
Weights on a symmetric 8-bit grid (Q8_0: `scale * q`, q in -127..127, the scale the block's largest magnitude
over 127) go into 8-bit MatMulNBits as they are, with zero point 128 and no extra term; ONNX Runtime's own 8-bit
rounding puts that largest magnitude on -128 instead, a different grid. Weights not on such a grid (random or
trained-in-float weights) are left to the ordinary quantizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

LEVELS = 16  # 4 bits
SYMMETRIC_MAX = 127  # Q8_0: q in -127..127
GRID_BLOCK = 32  # GGUF's blocks (Q4_0, Q4_1, Q8_0) along K
TOLERANCE = 1e-3  # in grid steps: how far a dequantized value may sit from its grid point (fp32 rounding)


@dataclass(frozen=True)
class GridWeight:
    """A [K, N] weight on a per-block affine 4-bit grid: W[k, n] = offset[k // block, n] + scale[...] * q[k, n]."""

    q: np.ndarray  # [K, N] uint8 in 0..15
    scale: np.ndarray  # [K / block, N] float32
    offset: np.ndarray  # [K / block, N] float32
    block: int


def on_grid(weight: np.ndarray, block: int) -> GridWeight | None:
    """The weight's 4-bit grid, or None when some block of `block` rows holds values off any 16-level grid."""
    k, n = weight.shape
    if k % block:
        return None
    blocks = weight.astype(np.float32, copy=False).reshape(k // block, block, n)  # [K / block, block, N]
    low = blocks.min(axis=1)  # [K / block, N]
    scale = (blocks.max(axis=1) - low) / (LEVELS - 1)  # the min and max sit on q = 0 and q = 15
    safe = np.where(scale > 0, scale, 1.0)
    steps = (blocks - low[:, None, :]) / safe[:, None, :]  # [K / block, block, N]
    q = np.rint(steps)
    if not np.isfinite(steps).all() or np.abs(steps - q).max() > TOLERANCE or q.max() > LEVELS - 1:
        return None
    return GridWeight(q.reshape(k, n).astype(np.uint8), scale.astype(np.float32), low.astype(np.float32), block)


def on_symmetric_grid(weight: np.ndarray, block: int) -> GridWeight | None:
    """The weight's symmetric 8-bit grid (q stored as q + 128, offset 0), or None when it is not on one."""
    k, n = weight.shape
    if k % block:
        return None
    blocks = weight.astype(np.float32, copy=False).reshape(k // block, block, n)  # [K / block, block, N]
    scale = np.abs(blocks).max(axis=1) / SYMMETRIC_MAX  # [K / block, N]
    steps = blocks / np.where(scale > 0, scale, 1.0)[:, None, :]
    q = np.rint(steps)
    if not np.isfinite(steps).all() or np.abs(steps - q).max() > TOLERANCE:
        return None
    return GridWeight((q + 128).reshape(k, n).astype(np.uint8), scale.astype(np.float32),
                      np.zeros_like(scale, dtype=np.float32), block)


def store_symmetric_grids(model: onnx.ModelProto, accuracy_level: int, only: AbstractSet[str] | None = None,
                          skip: AbstractSet[str] = frozenset()) -> list[str]:
    """Rewrite every weight MatMul (those in `only` when given, none in `skip`) whose weight lies on a symmetric
    8-bit grid into 8-bit MatMulNBits, in place. Returns the names of the MatMuls rewritten."""
    graph = model.graph
    stored: list[str] = []
    for index, node, grid in _on_grids(model, on_symmetric_grid, only, skip):
        k, n = grid.q.shape
        name = node.name or node.output[0]
        q = grid.q.T.reshape(n, k // grid.block, grid.block)  # [N, K / block, block]
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(q), f"{name}_grid_q"),
            numpy_helper.from_array(np.ascontiguousarray(grid.scale.T).reshape(-1), f"{name}_grid_scales"),
            numpy_helper.from_array(np.full(n * (k // grid.block), 128, dtype=np.uint8), f"{name}_grid_zero_points")])
        graph.node[index].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], f"{name}_grid_q", f"{name}_grid_scales", f"{name}_grid_zero_points"],
            list(node.output), name=f"{name}_grid", domain="com.microsoft", K=k, N=n, bits=8,
            block_size=grid.block, accuracy_level=accuracy_level))
        stored.append(name)
        _drop_unread(graph, node.input[1])
    if stored:
        _with_contrib_ops(model)
    return stored


def _on_grids(model: onnx.ModelProto, find: Callable[[np.ndarray, int], GridWeight | None],
              only: AbstractSet[str] | None, skip: AbstractSet[str]
              ) -> Iterator[tuple[int, onnx.NodeProto, GridWeight]]:
    """The weight MatMuls (those in `only` when given, none in `skip`) whose weight `find` places on a grid of
    blocks of 32, with their index and that grid."""
    inits = {i.name: i for i in model.graph.initializer}
    for index, node in enumerate(list(model.graph.node)):
        if (node.op_type != "MatMul" or node.input[1] not in inits or node.name in skip
                or (only is not None and node.name not in only)):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        # Every block must lie on a grid: the first row of blocks decides most weights (those in float) without
        # the whole weight's temporaries, which for a large head are several times its size.
        grid = (find(weight, GRID_BLOCK) if weight.ndim == 2 and find(weight[:GRID_BLOCK], GRID_BLOCK) is not None
                else None)
        if grid is not None:
            yield index, node, grid


def _with_contrib_ops(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _drop_unread(graph: onnx.GraphProto, name: str) -> None:
    if not any(name in n.input for n in graph.node):
        for k in reversed(range(len(graph.initializer))):
            if graph.initializer[k].name == name:
                del graph.initializer[k]


def pack_matmul_nbits(grid: GridWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' layout: B [N, K / block, block / 2] (two values a byte, low nibble first), scales [N, K / block],
    zero points [N, ceil(K / block / 2)] all 0."""
    k, n = grid.q.shape
    blocks = k // grid.block
    q = grid.q.T.reshape(n, blocks, grid.block)  # [N, K / block, block]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [N, K / block, block / 2]
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    return packed, np.ascontiguousarray(grid.scale.T), zero_points


def store_source_grids(model: onnx.ModelProto, accuracy_level: int, only: AbstractSet[str] | None = None,
                       skip: AbstractSet[str] = frozenset()) -> list[str]:
    """Rewrite every weight MatMul (those in `only` when given, none in `skip`) whose weight lies on a 4-bit grid
    into the exact form above, in place. Returns the names of the offset MatMuls it added (the ordinary quantizer
    must leave them alone)."""
    graph = model.graph
    offset_matmuls: list[str] = []
    nodes = list(graph.node)
    rewritten: dict[int, list[onnx.NodeProto]] = {}
    blocksums: dict[str, str] = {}  # activation -> its block sums, shared by matmuls reading the same input
    used: set[str] = set()
    for index, node, grid in _on_grids(model, on_grid, only, skip):
        k, n = grid.q.shape
        x, name = node.input[0], node.name or node.output[0]
        packed, scales, zero_points = pack_matmul_nbits(grid)
        new: list[onnx.NodeProto] = []
        graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_grid_q"),
                                  numpy_helper.from_array(scales.reshape(-1), f"{name}_grid_scales"),
                                  numpy_helper.from_array(zero_points.reshape(-1), f"{name}_grid_zero_points"),
                                  numpy_helper.from_array(grid.offset, f"{name}_grid_offsets")])
        new.append(helper.make_node(
            "MatMulNBits", [x, f"{name}_grid_q", f"{name}_grid_scales", f"{name}_grid_zero_points"],
            [f"{name}_grid_product"], name=f"{name}_grid", domain="com.microsoft",
            K=k, N=n, bits=4, block_size=grid.block, accuracy_level=accuracy_level))
        if x not in blocksums:
            shape = f"{name}_grid_blocks_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, k // grid.block, grid.block],
                                                                      dtype=np.int64), shape))
            new.append(helper.make_node("Reshape", [x, shape], [f"{name}_grid_blocks"],
                                        name=f"{name}_grid_blocks"))  # [B, S, K / block, block]
            new.append(helper.make_node("ReduceSum", [f"{name}_grid_blocks", f"{name}_grid_axis"],
                                        [f"{name}_grid_blocksum"], name=f"{name}_grid_blocksum", keepdims=0))
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}_grid_axis"))
            blocksums[x] = f"{name}_grid_blocksum"  # [B, S, K / block]
        offset_name = f"{name}_grid_offset_matmul"
        new.append(helper.make_node("MatMul", [blocksums[x], f"{name}_grid_offsets"], [f"{name}_grid_offset"],
                                    name=offset_name))  # [B, S, N]
        new.append(helper.make_node("Add", [f"{name}_grid_product", f"{name}_grid_offset"], list(node.output),
                                    name=f"{name}_grid_sum"))
        offset_matmuls.append(offset_name)
        rewritten[index] = new
        used.add(node.input[1])
    if not rewritten:
        return []
    graph.ClearField("node")
    for index, node in enumerate(nodes):
        graph.node.extend(rewritten.get(index, [node]))
    still_read = {i for n in graph.node for i in n.input}
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name in used and graph.initializer[k].name not in still_read:
            del graph.initializer[k]
    _with_contrib_ops(model)
    return offset_matmuls
