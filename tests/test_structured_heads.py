"""Structured pruning of Hugging Face BERT-style attention by whole heads, and of its feed-forward neurons,
on a tiny randomly initialised transformers BertModel wrapped like all-MiniLM-L6-v2 (no download)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim import Registry
from torchslim.examples import minilm
from torchslim.examples.minilm import SentenceEncoder
from torchslim.plugins.prune import StructuredPrune

from .conftest import FAST_METRICS, make_ctx

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny layers: a second thread only waits on a shared machine

HEADS, HEAD_DIM, LAYERS, FFN = 4, 8, 2, 64


def tiny_bert(attention: str = "sdpa") -> SentenceEncoder:
    """A 2-layer BERT (hidden 32, 4 heads of 8, feed-forward 64, vocabulary 100), random but seeded."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HEADS * HEAD_DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        attn_implementation=attention,
    )
    return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()


def token_ids(count: int = 16, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids, the second half of the rows padded (0) over their last 4 positions."""
    ids = torch.randint(1, 100, (count, length), generator=torch.Generator().manual_seed(seed))
    ids[count // 2 :, -4:] = 0
    return ids


def tiny_loaders(batch_size: int = 8) -> dict[str, DataLoader]:
    """Token ids and the unpruned tiny model's embeddings, as minilm.loaders gives them."""
    ids = token_ids()
    with torch.no_grad():
        data = TensorDataset(ids, tiny_bert()(ids))
    return {name: DataLoader(data, batch_size=batch_size) for name in ("train", "calibration", "eval")}


def attentions(model: nn.Module) -> list[nn.Module]:
    return [layer.attention for layer in model.encoder.encoder.layer]


def pruned(options: dict, attention: str = "sdpa") -> tuple[nn.Module, nn.Module, torchslim.Context]:
    """(original, pruned, the stage's context) for a StructuredPrune with ``options``."""
    original = tiny_bert(attention)
    ctx = make_ctx(original, tiny_loaders(), evaluate=lambda m: 0.0)
    return original, StructuredPrune(**options).apply(copy.deepcopy(original), ctx), ctx


@pytest.mark.parametrize(("scope", "attention"), [("global", "sdpa"), ("layer", "eager")])
def test_heads_and_feed_forward_pruned_and_counts_updated(scope: str, attention: str) -> None:
    _, model, ctx = pruned({"amount": 0.5, "head_amount": 0.5, "scope": scope}, attention)
    for block in attentions(model):
        heads = block.self
        assert (heads.num_attention_heads, heads.attention_head_size, heads.all_head_size) == (2, HEAD_DIM, 16)
        assert heads.query.out_features == heads.key.out_features == heads.value.out_features == 16
        assert block.output.dense.in_features == 16 and block.output.dense.out_features == HEADS * HEAD_DIM
    widths = [layer.intermediate.dense.out_features for layer in model.encoder.encoder.layer]
    assert sum(widths) == LAYERS * FFN // 2 and (scope == "global" or widths == [FFN // 2] * LAYERS)
    assert [layer.output.dense.in_features for layer in model.encoder.encoder.layer] == widths
    assert ctx.metrics["pruned_heads"] == LAYERS * 2 and ctx.metrics["pruned_channels"] == pytest.approx(0.5)
    longer = token_ids(3, 20, seed=2)
    assert model(longer).shape == (3, HEADS * HEAD_DIM)  # another batch and sequence length


def test_gradual_heads_reach_the_amount_and_restore() -> None:
    stage = StructuredPrune(amount=0.5, head_amount=0.5, steps=2)
    original = tiny_bert()
    ctx = make_ctx(original, tiny_loaders(), evaluate=lambda m: 0.0)
    model = stage.apply(copy.deepcopy(original), ctx)
    assert [block.self.num_attention_heads for block in attentions(model)] == [2] * LAYERS
    rebuilt = stage.restore(tiny_bert(), ctx.restore_record)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert [block.self.all_head_size for block in attentions(rebuilt)] == [16] * LAYERS
    ids = token_ids(3, 6, seed=6)
    assert torch.equal(rebuilt(ids), model(ids))


def test_kept_heads_are_whole() -> None:
    """The pruned model equals the original with the removed heads' output columns zeroed: every kept head
    keeps all its query, key and value rows, in place."""
    original, model, _ = pruned({"amount": 0.5, "head_amount": 0.25, "exclude": ["*intermediate*"]})
    masked = copy.deepcopy(original)
    for before, after, target in zip(attentions(original), attentions(model), attentions(masked), strict=True):
        rows = before.self.query.weight.view(HEADS, HEAD_DIM, -1)
        kept = [
            h
            for h in range(HEADS)
            if any(torch.equal(rows[h], block) for block in after.self.query.weight.view(-1, HEAD_DIM, rows.shape[-1]))
        ]
        assert len(kept) == after.self.num_attention_heads == 3
        with torch.no_grad():
            for head in set(range(HEADS)) - set(kept):
                target.output.dense.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    ids = token_ids(4, 9, seed=3)
    assert torch.allclose(model(ids), masked(ids), atol=1e-5)
    assert not torch.allclose(model(ids), original(ids), atol=1e-3)


def test_never_every_head() -> None:
    _, model, ctx = pruned({"amount": 0.5, "head_amount": 0.9, "max_layer_amount": 0.95})
    assert [block.self.num_attention_heads for block in attentions(model)] == [1] * LAYERS
    assert model(token_ids(2, 5)).shape == (2, HEADS * HEAD_DIM)
    assert ctx.metrics["pruned_heads"] == LAYERS * (HEADS - 1)


@pytest.mark.parametrize(
    "options", [{"head_amount": 0.0}, {"exclude": ["*attention*", "*embeddings*"]}], ids=["head_amount-0", "attention-excluded"]
)
def test_feed_forward_only_keeps_every_head(options: dict) -> None:
    _, model, ctx = pruned({"amount": 0.5, **options})
    assert [block.self.num_attention_heads for block in attentions(model)] == [HEADS] * LAYERS
    assert all(block.self.query.out_features == HEADS * HEAD_DIM for block in attentions(model))
    assert sum(layer.intermediate.dense.out_features for layer in model.encoder.encoder.layer) == LAYERS * FFN // 2
    assert "pruned_heads" not in ctx.metrics


def test_head_amount_is_validated() -> None:
    with pytest.raises(ValidationError, match="head_amount"):
        StructuredPrune(amount=0.5, head_amount=1.0)
    with pytest.raises(ValidationError, match=r"more than max_layer_amount 0\.5"):
        StructuredPrune(amount=0.5, head_amount=0.75, max_layer_amount=0.5)


def test_head_amount_without_attention_says_so(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = make_ctx(trained_mlp, flat)
    StructuredPrune(amount=0.5, head_amount=0.5).apply(copy.deepcopy(trained_mlp), ctx)
    assert any("removed no head: no attention layer" in note for note in ctx.notes)


def heads_recipe(options: dict) -> dict:
    """A recipe that prunes the tiny BERT with a structured stage of ``options``, scored by cosine."""
    return {
        "name": "heads",
        "seed": 0,
        "model": {"target": "tests.test_structured_heads:tiny_bert"},
        "data": {"target": "tests.test_structured_heads:tiny_loaders"},
        "evaluate": {"metric": "torchslim.examples.minilm:cosine", "name": "cosine"},
        "metrics": dict(FAST_METRICS),
        "stages": [{"type": "prune", "method": "structured", **options}],
    }


def test_saved_model_reloads_with_its_head_counts(tmp_path: Path) -> None:
    registry = Registry.load(autoload=False)
    report = torchslim.run(heads_recipe({"amount": 0.5, "head_amount": 0.5}), tmp_path, registry=registry)
    loaded = torchslim.load_model(tmp_path, registry)
    assert [(b.self.num_attention_heads, b.self.all_head_size) for b in attentions(loaded)] == [(2, 16)] * LAYERS
    _, expected, _ = pruned({"amount": 0.5, "head_amount": 0.5})
    ids = token_ids(5, 7, seed=4)
    assert torch.equal(loaded(ids), expected(ids))
    assert report.final.metrics["macs"] < report.baseline.metrics["macs"]


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo ONNX exporter needs onnxscript")
def test_pruned_model_exports_to_onnx_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    _, model, _ = pruned({"amount": 0.5, "head_amount": 0.5})
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},)
    program = torch.onnx.export(model, (token_ids(2, 6),), dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    ids = token_ids(3, 11, seed=5)
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), model(ids).detach(), atol=1e-5)


def test_heads_and_neurons_chosen_by_activation_and_refit_reload(tmp_path: Path) -> None:
    """Data-aware choice and the least-squares refit on attention: the output projections and feed-forward
    outputs are refit (four layers), the embeddings come closer to the original's, and the run reloads."""
    options = {"amount": 0.5, "head_amount": 0.5, "importance": "activation", "exclude": ["*embeddings*"]}
    registry = Registry.load(autoload=False)
    report = torchslim.run(heads_recipe({**options, "refit": True}), tmp_path, registry=registry)
    assert report.final.metrics["refit_layers"] == 2 * LAYERS
    _, plain, _ = pruned(options)
    loaders = tiny_loaders()
    assert report.final.metrics["cosine"] > minilm.cosine(plain, loaders["eval"])
    loaded = torchslim.load_model(tmp_path, registry)
    ids = token_ids(5, 7, seed=4)
    assert torch.equal(loaded(ids), report.model(ids))
