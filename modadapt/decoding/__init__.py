"""Decoding with a static KV cache and CUDA graphs, for dense and converted models alike.

Eager decoding of a ~1B model is bound by the host: Python and kernel launches take several
times the GPU's own time, and a MoD layer's decision needs a host sync, which eats most of what
skipping saves. `GraphedDecoder` captures the decode step and replays it. A MoD layer's work runs
only when some row keeps the token; how that branch is taken (`branches`):

- ``"conditional"``: a CUDA conditional node, the GPU skips the layer itself (torch builds that
  expose `CUDAGraph.begin_capture_to_if_node`; one graph per step);
- ``"host"``: the step is captured as pieces between MoD layers; after each routing piece the
  host polls the decision's byte in pinned memory and replays the layer's graph or not;
- ``"select"``: one graph, every MoD layer always runs and `where` keeps the input of rows that
  skip (no skipped work, no sync; but at a batch a skipping row costs as much as a kept one);
- ``"gather"``: the MoD layer computes only the rows that keep: its work is captured for a few
  row counts (`step.gather_buckets`: powers of two up to the batch), the routing piece orders the
  kept rows first and the host, reading one byte per MoD layer as with ``"host"``, replays the
  smallest bucket that holds them (or none); the bucket's rows are gathered, attend to their own
  cache rows, and the kept ones are copied back;
- ``"gather-conditional"``: the same, the bucket chosen on the GPU (one conditional node per
  bucket; one graph per step).

``"auto"`` picks conditional where available, else host at batch 1, and above it host where the
prompt says that no row keeps a MoD layer's token often enough (`step.none_kept`), else select
(`step.auto_branches`, the rule `benchmarks/speed.py --scenarios decode_branches` measured; the
gathered modes never won there). In every mode a row that skips writes no K/V that is kept
and reads none, so each row generates what it would alone (rows computed in a step that another
row keeps are discarded).

The cache is static and compacted per row (`static_cache`). A MoD layer's capacity is what its
rows kept in the prompt plus the new tokens, rounded up to `BUCKET` so that captured steps are
reused across prompts; KV bytes shrink with the skipped pairs. The prompt runs eagerly (packed
MoD layers where they apply) and its cache is copied in.

One concept per module: `static_cache` (the buffers and the attention that reads them), the
decode kernels (`split_kv`: the attention; `decode_linear`: few-row linear layers, and
`fuse_linears`, the compiled step's pass that merges those of one input; `kv_write`: the K/V write; `fallback`: a kernel tried once, then the next path; `driver_graph`: conditional
nodes through the CUDA driver),
`sampling` (token choice inside a graph), `step` (a step's pieces, capture and replay per branch
mode), `speculate` (speculative decoding: the converted model drafts, the dense computation verifies),
`compiled` (`compile=True`: the step's layers through `torch.compile`, compiled in the warm-up),
`decoder` (`GraphedDecoder`: prefill, decode, generate).

What a family must provide (embedding, rotary embedding or learned position embedding, final
norm, head, the prompt's cache, the attention that reads the static cache) comes from its adapter
(`Adapter.decode_parts`), so this package knows no model family. Supported: Llama-style decoders
(`adapters.hf`: Llama, Mistral, Qwen2/3, Phi-3, OLMo 2, Gemma 1/2/3, Mixtral, Qwen2/3-MoE) and
GPT-2 (see docs/decoding.md for what is refused), their sliding-window layers at any length (the
static cache keeps every token, a query reads its window: `static_cache`), and routers marked
`graphable` (all built-in ones but attention routing, which reads the previous layer's attention map).
"""

from .decoder import BUCKET, CHECK_EVERY, GraphedDecoder
from .sampling import Sampling
from .speculate import Draft
from .step import BRANCHES, available_branches, conditional_nodes_available

__all__ = [
    "BRANCHES",
    "BUCKET",
    "CHECK_EVERY",
    "Draft",
    "GraphedDecoder",
    "Sampling",
    "available_branches",
    "conditional_nodes_available",
]
