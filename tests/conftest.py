"""Shared fixtures: tiny seeded models of every supported family, and routers that really skip;
and the helpers several test files share (benchmark scripts, experts' routers, decoding checks).

A freshly converted model keeps every token (zero-initialised routers), which would make most
invariants trivially true; `randomize_routers` gives the routers random weights so that routing
actually skips tokens, and differently in each row.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modadapt
from modadapt.adapters.hf.presets import DECODER_FAMILIES

#: The families the hf-decoder adapter is tested on, one `tiny-<family>` preset each.
FAMILIES = tuple(DECODER_FAMILIES)
#: Families the expensive invariants (generation, padding, persistence, ...) run on: learned and
#: rotary positions, sliding and global layers in one stack (Gemma 3), mixtures of experts (Mixtral).
CORE_FAMILIES = ("llama", "gpt2", "gemma3", "mixtral")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:.*gradient_checkpointing.*:FutureWarning")


def pytest_generate_tests(metafunc):
    """`family` runs a test for every supported family; `core_family` for `CORE_FAMILIES` only."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)
    if "core_family" in metafunc.fixturenames:
        metafunc.parametrize("core_family", CORE_FAMILIES)


#: What `modadapt.save` writes for a byte-level text preset: config, metadata, weights and the
#: preset's byte tokenizer.
SAVED_FILES = ["config.json", "modadapt.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

# Text for recipe tests: code and prose, enough for a few dozen 32-token blocks.
SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b  # Python docs, roughly.\n" * 40
    + "The quick brown fox jumps over the lazy dog. " * 40
)


# Text for short lm-adapt runs that vary one recipe option (schedules, router init).
RECIPE_TEXT = "The quick brown fox jumps over the lazy dog; grep -r pattern dir lists matches. " * 60


def lm_adapt_config(tmp_path, **extra):
    """A short lm-adapt run in `tmp_path` on `RECIPE_TEXT` (topk at 0.25, everything trains, no
    distillation, 6 steps of 4 x 32 tokens); `extra` overrides any field."""
    from modadapt.recipes.lm_adapt import LMAdaptConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.txt").write_text(RECIPE_TEXT)
    base = dict(
        data=str(tmp_path / "train.txt"),
        output=str(tmp_path / "run"),
        seq_len=32,
        batch_size=4,
        max_steps=6,
        lr=1e-3,
        progress=False,
        cpu=True,
        router="topk",
        capacity=0.25,
        train="all",
        max_train_blocks=24,
        max_eval_blocks=4,
        distill=0.0,
    )
    return LMAdaptConfig(**{**base, **extra})


@contextlib.contextmanager
def threads_restored():
    """Code that sets torch's thread count (the benchmarks pin one on CPU) leaves the tests after it theirs."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared CPU: one thread is many times faster than oversubscribed ones
    (a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with threads_restored():
        torch.set_num_threads(1)
        yield


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch):
    """A fresh module of `benchmarks/<name>.py` (the scripts are no package). While `monkeypatch`
    lasts it is `sys.modules[name]` (its dataclasses look their module up) and `benchmarks/` is on
    the path (it imports its siblings)."""
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (dropout, sampling, random routers)."""
    torch.manual_seed(0)


def build_tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny dense model of `family` with weights drawn from `seed`, in eval mode."""
    model = modadapt.build_preset(f"tiny-{family}", seed=seed)
    # Generation defaults of the presets point at token ids outside the tiny vocabulary.
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def widened(model, window=64):
    """Gemma 2/3's tiny sliding window (4) cuts every test prompt: a window out of reach (or,
    given a small `window`, another one), in the config (the masks) and in each attention module
    (which read it at init), for the tests that are not about windows."""
    if getattr(model.config, "sliding_window", None) is not None:
        model.config.sliding_window = window
        for module in model.modules():
            if getattr(module, "sliding_window", None) is not None:
                module.sliding_window = window
    return model


#: The tiny families `GraphedDecoder` decodes (`test_graphed_decode` checks them against the adapter's).
GRAPHED_FAMILIES = (
    "llama",
    "llama-tied",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3",
    "mixtral",
    "qwen2-moe",
    "qwen3-moe",
    "gpt2",
)
#: Every family whose config has a sliding window (`test_graphed_decode` checks the list).
WINDOWED_FAMILIES = ("mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen2-moe", "qwen3-moe", "gemma2", "gemma3")


def build_windowed(family: str, window: int | None = 8, seed: int = 0) -> torch.nn.Module:
    """`build_tiny(family, seed)` with a sliding window of `window` (the weights the same): Gemma
    2/3's sliding layers narrowed or widened to it; a family with `layer_types` (Qwen2/3 and their
    MoE) given Gemma's mix of two sliding layers then two global ones; Mistral, Mixtral and Phi-3
    (no layer types) the window in every layer. The model is rebuilt from its config, since the
    layers read their type at init. `window=None`: any family, a window it has out of reach
    (`widened`), for the tests that are not about windows."""
    model = build_tiny(family, seed)
    if window is None:
        return widened(model)
    if family not in WINDOWED_FAMILIES:
        raise ValueError(f"tiny-{family} has no sliding window")
    if family in ("gemma2", "gemma3"):
        return widened(model, window)
    config = model.config
    config.sliding_window = window
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = True
    if hasattr(config, "layer_types"):
        config.layer_types = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    rebuilt = type(model)(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.generation_config = model.generation_config
    return rebuilt.eval()


@pytest.fixture
def tiny():
    """Factory: `tiny(family, seed=0)` builds a seeded tiny dense model (eval mode)."""
    return build_tiny


def randomize_router_weights(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Give every MoD layer's router random weights so that its decisions differ per token.

    Sets `router.scorer.weight` to `randn * scale` (a causal-rule predictor, if any, gets a random
    output layer too). The `random` router has no weights and is left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = modadapt.mod_layers(model)
    assert layers, "the model has no MoD layer"
    with torch.no_grad():
        for layer in layers:
            scorer = getattr(layer.router, "scorer", None)
            if scorer is not None:
                scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=generator) * scale)
            predictor = getattr(layer.router, "predictor", None)
            if predictor is not None:
                out = predictor[-1]
                out.weight.copy_(torch.randn(out.weight.shape, generator=generator) * scale)
    return model


@pytest.fixture
def randomize_routers():
    """Function fixture: `randomize_routers(model, scale=1.0, seed=0)` (see `randomize_router_weights`)."""
    return randomize_router_weights


def make_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """Random token ids in [1, vocab) (0 is kept for padding)."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    """Factory: `ids(batch, length, seed=0)` gives random token ids that never use the pad id 0."""
    return make_ids


def beam_search_scored(model: torch.nn.Module, prompt: torch.Tensor, new: int):
    """Two beams of `new` tokens after `prompt`; asserts each beam's score is its log-prob
    recomputed by a full forward (beam reordering must move the MoD bookkeeping with the K/V).
    Returns the generate output."""
    T = prompt.shape[1]
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=new,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
            length_penalty=0.0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = model(out.sequences).logits.float().log_softmax(-1)
    recomputed = logprobs[:, T - 1 : -1].gather(-1, out.sequences[:, T:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, recomputed, rtol=0, atol=1e-4)
    return out


def sampled_rows_match_recompute(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, new: int, seed: int):
    """Two sampled sequences per left-padded prompt of `x`; asserts each row's step logits equal
    that row recomputed alone (num_return_sequences expands the batch and its MoD bookkeeping).
    Returns the generate output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=True,
            top_k=0,
            num_return_sequences=2,
            output_logits=True,
            return_dict_in_generate=True,
        )
        for row in range(out.sequences.shape[0]):
            length = int(mask[row // 2].sum())
            alone = model(out.sequences[row, x.shape[1] - length :][None]).logits[0]
            for step, logits in enumerate(out.logits):
                torch.testing.assert_close(logits[row], alone[length - 1 + step], rtol=0, atol=1e-5)
    return out


def left_pad_batch(prompts: list[torch.Tensor], pad_id: int = 0):
    """Left-pad 1-D prompts into (input_ids, attention_mask, position_ids) without a tokenizer."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


@pytest.fixture
def left_pad():
    """Function fixture: `left_pad(prompts)` -> (input_ids, attention_mask, position_ids)."""
    return left_pad_batch


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss a model's `loss` holds (next-token cross-entropy, labels -100 ignored),
    for checking what the auxiliary losses add to it."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


#: The tiny presets whose MLP is a mixture of experts.
MOE_FAMILIES = ["mixtral", "qwen2-moe", "qwen3-moe"]


def expert_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """`(layer index, router)` of every experts' router (the families' `*TopKRouter`, in the MLP)."""
    _, stack = modadapt.plugins.find_adapter(model).layer_stack(model)
    return [
        (i, m) for i, layer in enumerate(stack) for m in layer.mlp.modules() if type(m).__name__.endswith("TopKRouter")
    ]


@contextlib.contextmanager
def watching_expert_routers(model: torch.nn.Module, record):
    """Every experts' router call inside the block, in call order: `(layer, *record(output))`
    (the tests watch the calls with hooks of their own, not the code under test)."""
    calls = []
    handles = [
        m.register_forward_hook(lambda module, args, out, _i=i: calls.append((_i, *record(out))))
        for i, m in expert_routers(model)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def keep_masks(model: torch.nn.Module) -> list[torch.Tensor]:
    """The keep decisions `[B, T]` of every MoD layer's last forward."""
    return [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]


@pytest.fixture
def last_keeps():
    """Function fixture: `last_keeps(model)` -> list of each MoD layer's last keep mask."""
    return keep_masks


@pytest.fixture
def interrupt_at_step(monkeypatch):
    """`arm(n)` makes the n-th AdamW step raise KeyboardInterrupt: a run killed mid-training.
    `monkeypatch.undo()` disarms it."""

    def arm(n: int) -> None:
        calls = {"n": 0}
        original = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)

    return arm


# --- decoding: GraphedDecoder against model.generate (test_graphed_decode, test_speculative_decode) ---


def routed(model: torch.nn.Module, router: str = "threshold-p", **config) -> torch.nn.Module:
    """`model` converted on all layers but the first, with routers that really skip
    (`randomize_router_weights`), in eval mode: what the decoding tests decode."""
    model = modadapt.convert(model, router=router, layers="all-but-first", **config)
    return randomize_router_weights(model).eval()


def greedy(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, new: int, **kwargs) -> torch.Tensor:
    """`model.generate`'s greedy tokens, exactly `new` of them: what a decoder must give."""
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def stops_at_end_of_sequence(reference: torch.nn.Module, decoder, both_rows_end: bool) -> None:
    """Asserts that `decoder` stops a left-padded batch of two rows where `reference.generate`
    does when the end token is one the first row (and, `both_rows_end`, the second) emits, and
    ends early only when both rows end."""
    x, mask, _ = left_pad_batch([make_ids(1, n, seed=n)[0] for n in (6, 9)])
    free = greedy(reference, x, mask, 24)[:, x.shape[1] :]
    eos = [int(free[0, 5])] + ([int(free[1, 4])] if both_rows_end else [])
    with torch.no_grad():
        expected = reference.generate(
            x, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    got = decoder.generate(x, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got.shape[1] < x.shape[1] + 24) == both_rows_end


def sampling_is_seeded(generate, *args, **kwargs) -> torch.Tensor:
    """Asserts that `generate(*args, **kwargs)`, a sampled generation, is seeded by
    `torch.manual_seed`: the same seed draws the same tokens, another seed others. Returns the
    first draw."""
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(generate(*args, **kwargs))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    return draws[0]


def counting_compiles(monkeypatch: pytest.MonkeyPatch):
    """Swap the decoder's torch.compile backend for inductor behind a counter of compiled frames."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from modadapt.decoding import compiled

    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(compiled, "BACKEND", counter)
    return counter


def cuda_prompts() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The CUDA decoding tests' prompts, `(input_ids, attention_mask)` on the GPU: one row of 11
    tokens, and a left-padded batch of 7, 12 and 4."""
    batches = ([make_ids(1, 11, seed=1)[0]], [make_ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    return [tuple(t.cuda() for t in left_pad_batch(prompts)[:2]) for prompts in batches]


def flash_and_fallback(q, k, v, lengths, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The static attention in float32 through flash (asserted to have run) and through the masked
    fallback, for the CUDA tests that hold one against the other."""
    from modadapt.decoding import static_cache

    kernel, static_cache.DECODE_KERNEL = static_cache.DECODE_KERNEL, "flash"
    try:
        flash = static_cache.static_cache_attention(q, k, v, lengths, scale).float()
    finally:
        static_cache.DECODE_KERNEL = kernel
    key = static_cache.flash_key(q)
    assert static_cache._FLASH.get(key)
    static_cache._FLASH[key] = False
    try:
        reference = static_cache.static_cache_attention(q, k, v, lengths, scale).float()
    finally:
        static_cache._FLASH[key] = True
    return flash, reference
