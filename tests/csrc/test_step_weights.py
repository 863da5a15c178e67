"""The C++ step's typed model description (csrc/step_weights.h, built by engine/step/native_weights.py): views of the
model's memory, kept alive by the step, and checked at construction with errors that name the field."""

from __future__ import annotations

import dataclasses
import gc
import re

import numpy as np
import pytest
import torch

from calm_engine import native
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.step import native_step
from calm_engine.engine.step.backbone import rotary_table
from calm_engine.engine.step.native_weights import native_step_weights
from calm_engine.engine.weights import ModelWeights
from tests.model_factory import context_sensitive_model, random_calm_model, random_token_llama

_calm_cpu = native.calm_cpu
BLAS = native_step.torch_blas_addresses()
pytestmark = pytest.mark.skipif(
    _calm_cpu is None or BLAS is None, reason="calm_engine._calm_cpu is not built or torch exports no sgemm_"
)
# biases on every linear that may have one, and two kv heads for four query heads
BIASED = dict(calm=dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True))


def tensor_fields(node, path=()):
    """(path, tensor) for every tensor of a ModelWeights tree; a path is a tuple of field names and tuple indices."""
    if isinstance(node, torch.Tensor):
        yield path, node
    elif dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from tensor_fields(getattr(node, field.name), (*path, field.name))
    elif isinstance(node, tuple):
        for i, item in enumerate(node):
            yield from tensor_fields(item, (*path, i))


def field_name(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def replaced(node, path, value):
    """The tree with the field at `path` replaced by `value` (frozen dataclasses and tuples rebuilt on the way)."""
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(node)
        items[head] = replaced(items[head], rest, value) if rest else value
        return tuple(items)
    return dataclasses.replace(node, **{head: replaced(getattr(node, head), rest, value) if rest else value})


def cache_and_rope(model, slots: int = 3, capacity: int = 6):
    config = model.config
    cache = SlotKVCache(config, slots, capacity, model.device, model.dtype)
    cos, sin = rotary_table(ModelWeights.of(model).shapes, capacity, model.device, model.dtype)
    return cache.keys, cache.values, cos, sin


MODEL = random_calm_model(seed=3, **BIASED)
WEIGHTS = ModelWeights.of(MODEL)
KEYS, VALUES, ROPE_COS, ROPE_SIN = cache_and_rope(MODEL)
MODEL_FIELDS = [path for path, _ in tensor_fields(WEIGHTS)]


def build(weights=WEIGHTS, keys=KEYS, values=VALUES, rope_cos=ROPE_COS, rope_sin=ROPE_SIN):
    return native_step_weights(weights, keys, values, rope_cos, rope_sin)


def getattr_path(node, path):
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def test_every_array_is_a_view_of_the_model_and_the_cache():
    step_weights = build()
    for path in MODEL_FIELDS:  # read back through StepWeights' typed fields
        array, tensor = getattr_path(step_weights, path), getattr_path(WEIGHTS, path)
        assert np.shares_memory(array, tensor.numpy()), field_name(path)
    for arrays, tensors in ((step_weights.keys, KEYS), (step_weights.values, VALUES)):
        assert all(np.shares_memory(a, t.numpy()) for a, t in zip(arrays, tensors, strict=True))
    assert np.shares_memory(step_weights.rope_cos, ROPE_COS.numpy())
    assert (step_weights.capacity, step_weights.scratch_slot) == (6, 3)
    assert step_weights.shapes.chunk_size == MODEL.config.chunk_size
    assert step_weights.backbone.layers[0].mlp.activation == MODEL.config.hidden_act


@pytest.mark.parametrize("path", MODEL_FIELDS, ids=field_name)
def test_each_misshapen_model_field_is_named(path):
    tensor = getattr_path(WEIGHTS, path)
    short = tensor[..., :-1].contiguous()  # the last dimension is checked against a fixed size for every field
    with pytest.raises(ValueError, match=rf"^StepWeights: {re.escape(field_name(path))}: expected \[.*\], got "):
        build(replaced(WEIGHTS, path, short))


@pytest.mark.parametrize("which", ["keys", "values"])
@pytest.mark.parametrize("layer", [0, 1])
def test_each_misshapen_cache_array_is_named(which, layer):
    arrays = {"keys": list(KEYS), "values": list(VALUES)}
    arrays[which][layer] = arrays[which][layer][..., :-1].contiguous()
    with pytest.raises(ValueError, match=rf"^StepWeights: {which}\[{layer}\]: expected \[.*\], got "):
        build(keys=arrays["keys"], values=arrays["values"])


@pytest.mark.parametrize("which", ["rope_cos", "rope_sin"])
def test_misshapen_rotary_tables_are_named(which):
    tables = {"rope_cos": ROPE_COS, "rope_sin": ROPE_SIN}
    tables[which] = tables[which][:, :-1].contiguous()
    with pytest.raises(ValueError, match=rf"^StepWeights: {which}: expected \[.*\], got "):
        build(rope_cos=tables["rope_cos"], rope_sin=tables["rope_sin"])


def test_the_message_says_which_sizes_were_expected():
    config = MODEL.config
    qkv = WEIGHTS.backbone.layers[1].qkv
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    bad = replaced(WEIGHTS, ("backbone", "layers", 1, "qkv", "weight"), qkv.weight[:-1].contiguous())
    bad = replaced(bad, ("backbone", "layers", 1, "qkv", "bias"), qkv.bias[:-1].contiguous())
    expected = (
        f"StepWeights: backbone.layers[1].qkv.weight: expected [{rows} = (heads + 2 kv_heads) head_dim, "
        f"{config.hidden_size} = hidden], got [{rows - 1}, {config.hidden_size}]"
    )
    with pytest.raises(ValueError) as error:
        build(bad)
    assert str(error.value) == expected
    cache = KEYS[0][:, :, :-1].contiguous()  # a capacity other than the rotary tables'
    with pytest.raises(ValueError, match=r"keys\[0\]: expected \[slots \+ 1, 2 = kv_heads, 6 = capacity, \d+ = head_"):
        build(keys=[cache, *KEYS[1:]])


def test_arrays_must_be_contiguous_float32_and_the_cache_writable():
    embed = WEIGHTS.backbone.embed
    with pytest.raises(ValueError, match=r"^StepWeights: backbone\.embed: expected float32, got float64$"):
        build(replaced(WEIGHTS, ("backbone", "embed"), embed.double()))
    transposed = embed.T.contiguous().T  # the same shape, column-major
    with pytest.raises(ValueError, match=r"^StepWeights: backbone\.embed: expected a C-contiguous array"):
        build(replaced(WEIGHTS, ("backbone", "embed"), transposed))
    step_weights = build()
    read_only = step_weights.values[1].view()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"^StepWeights: values\[1\]: expected a writable array"):
        _calm_cpu.StepWeights(
            step_weights.shapes, step_weights.backbone, step_weights.compression, step_weights.head,
            step_weights.decoder, step_weights.keys, [step_weights.values[0], read_only], step_weights.rope_cos,
            step_weights.rope_sin,
        )  # fmt: skip
    with pytest.raises(TypeError, match="numpy arrays"):
        _calm_cpu.StepWeights.Linear(embed)  # a tensor, not its numpy view


def test_norm_kinds_layer_counts_and_sizes_are_checked():
    with pytest.raises(ValueError, match=r"^StepWeights: backbone\.norm\.bias: expected None \(an RMSNorm\)"):
        build(replaced(WEIGHTS, ("backbone", "norm", "bias"), WEIGHTS.backbone.norm.weight.clone()))
    with pytest.raises(ValueError, match=r"^StepWeights: compression\.norm\.bias: expected a LayerNorm's bias"):
        build(replaced(WEIGHTS, ("compression", "norm", "bias"), None))
    with pytest.raises(ValueError, match=r"^StepWeights: head\.noise_norm\.eps: expected a finite eps"):
        build(replaced(WEIGHTS, ("head", "noise_norm", "eps"), float("nan")))
    with pytest.raises(ValueError, match=r"^StepWeights: decoder\.projection: expected an array \[.*\], got None"):
        build(replaced(WEIGHTS, ("decoder", "projection"), None))
    with pytest.raises(ValueError, match=r"^StepWeights: keys: expected one keys and one values array per layer"):
        build(keys=KEYS[:-1])
    with pytest.raises(ValueError, match=r"^StepWeights: shapes\.heads: 4 is not a multiple of kv_heads 3"):
        build(replaced(WEIGHTS, ("shapes", "kv_heads"), 3))
    with pytest.raises(ValueError, match=r"^StepWeights: shapes\.noise: expected a positive size, got 0"):
        build(replaced(WEIGHTS, ("shapes", "noise"), 0))
    with pytest.raises(ValueError, match="CALM models only"):
        native_step_weights(ModelWeights.of(random_token_llama(seed=1)), KEYS, VALUES, ROPE_COS, ROPE_SIN)


def test_activations_are_checked():
    field = ("decoder", "layers", 0, "mlp", "activation")
    expected = WEIGHTS.shapes.decoder_activation
    with pytest.raises(ValueError, match=rf"^StepWeights: decoder\.layers\[0\]\.mlp\.activation: 'swish' differs from "
                       rf"shapes\.decoder_activation '{expected}'$"):  # fmt: skip
        build(replaced(WEIGHTS, field, "swish"))
    with pytest.raises(ValueError, match=r"^StepWeights: shapes\.activation: unknown activation 'swish' \(known: silu"):
        build(replaced(WEIGHTS, ("shapes", "activation"), "swish"))


def decode_step(step_weights, screen=None):
    return _calm_cpu.DecodeStep(step_weights, BLAS.sgemm, BLAS.set_threads_local, 2, isa="generic", vocab_screen=screen)


def test_the_step_keeps_its_arrays_alive():
    """A StepWeights over copies that nothing else references: the step alone keeps them, and runs as the original."""
    model = context_sensitive_model(seed=5)
    weights = ModelWeights.of(model)
    copies = {path: tensor.clone() for path, tensor in tensor_fields(weights)}
    copied = weights
    for path, tensor in copies.items():
        copied = replaced(copied, path, tensor)
    config = model.config
    ids = np.arange(2 * config.chunk_size, dtype=np.int64).reshape(2, -1)
    positions, slots = np.array([0, 0]), np.array([0, 1])
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (2, config.noise_size)).astype(np.float32)
    expected = decode_step(build(weights, *cache_and_rope(model))).run(ids, positions, slots, noise)
    step = decode_step(build(copied, *cache_and_rope(model)))
    del copies, copied, path, tensor
    gc.collect()
    assert np.array_equal(step.run(ids, positions, slots, noise), expected)


def test_the_screen_names_a_projection_it_cannot_bound():
    step_weights = build()
    projection = WEIGHTS.decoder.projection
    norms = native_step.projection_row_norms(projection).numpy()
    norms[17] = np.inf
    screen = (BLAS.gemm_bf16 or 0, native_step.bfloat16_bits(projection), norms)
    with pytest.raises(ValueError, match=r"decoder\.projection rows of norm below 1e30; row 17 is not"):
        decode_step(step_weights, screen)
    with pytest.raises(ValueError, match=r"row_norms \[vocab\]"):
        decode_step(step_weights, (0, native_step.bfloat16_bits(projection), norms[:-1]))


def test_out_of_range_rows_are_named():
    step = decode_step(build())
    k, noise = MODEL.config.chunk_size, np.zeros((1, MODEL.config.noise_size), np.float32)
    ids = np.zeros((2, k), np.int64)
    with pytest.raises(ValueError, match=r"^DecodeStep\.run: row 1: slot 4 out of range \[0, 3\]"):
        step.run(ids, np.array([0, 0]), np.array([0, 4]), np.zeros((2, MODEL.config.noise_size), np.float32))
    with pytest.raises(ValueError, match=r"^DecodeStep\.prefill: last\[0\] = 2 out of range \[0, rows 2\)"):
        step.prefill(ids, np.array([0, 1]), np.array([0, 0]), np.array([2]), noise)
