"""The vocabulary head by chunks of positions (issue 33, item 4): the next token's cross-entropy and
the KL distillation taken from the hidden states a chunk at a time give the loss and the gradients of
the whole logits, on their own and inside end_to_end's objective; soft-capping (Gemma) included."""

import dataclasses

import pytest
import torch
from conftest import family_model, tiny_config
from transformers import AutoModelForCausalLM

from nmperm_plugin import PermuteConfig
from nmperm_plugin.arch.base import kl_distillation, next_token_cross_entropy
from nmperm_plugin.arch.decoder import DecoderAdapter
from nmperm_plugin.arch.head import TokenHead
from nmperm_plugin.learn.layers import capture_layer_inputs
from nmperm_plugin.learn.pipeline import make_run
from nmperm_plugin.learn.window import layer_stack, window_learning
from nmperm_plugin.plugins.registry import get_adapter

VOCAB = 5003  # not a multiple of anything: the last chunk is short


def _llama(vocab: int = VOCAB):
    torch.manual_seed(0)
    config = tiny_config()
    config.vocab_size = vocab
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def _models():
    return {"llama": _llama(), "gemma2": family_model("gemma2", vocab_size=VOCAB).requires_grad_(False)}


def _chunked(model, positions: int = 7) -> tuple:
    """The adapter's head and its :class:`TokenHead`, with ``positions`` positions per chunk."""
    adapter = get_adapter(model)
    head = adapter.head(model)
    token_head = adapter.token_head(model, head)
    assert isinstance(token_head, TokenHead) and token_head.vocab == VOCAB
    return head, TokenHead(head, VOCAB, logits_per_chunk=positions * VOCAB)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chunked_cross_entropy_and_kl_equal_the_whole_logits_with_their_gradients(family):
    model = _models()[family]
    head, chunked = _chunked(model)
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0  # the cap is inside the head
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 10, 64, generator=generator) * 4  # 27 positions: chunks of 7 and a short one
    dense = hidden + 0.5 * torch.randn(3, 10, 64, generator=generator)
    labels = torch.randint(0, VOCAB, (3, 10), generator=generator)
    labels[0, 3] = labels[2, 7] = -100  # ignored, as in the cross-entropy of the whole logits
    cases = {
        "ce": (lambda h: chunked.cross_entropy(h, labels), lambda h: next_token_cross_entropy(head(h), labels)),
        "kl": (lambda h: chunked.kl_distillation(h, dense), lambda h: kl_distillation(head(h), head(dense))),
    }
    for name, (chunks, whole) in cases.items():
        values, grads = [], []
        for loss_of in (chunks, whole):
            leaf = hidden.clone().requires_grad_()
            loss = loss_of(leaf)
            loss.backward()
            values.append(loss.detach())
            grads.append(leaf.grad)
        _close(values[0], values[1])
        _close(grads[0], grads[1])
        assert grads[0].abs().sum() > 0, name
        with torch.no_grad():  # what selection runs: no gradient kept
            _close(chunks(hidden), values[1])


def test_a_family_with_its_own_losses_keeps_the_whole_output():
    class Classifier(DecoderAdapter):
        def task_loss(self, logits, labels):
            return torch.nn.functional.cross_entropy(logits, labels)

    model = _llama()
    assert Classifier().token_head(model, lambda h: h) is None
    assert get_adapter(model).token_head(model, lambda h: h) is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_end_to_end_objective_by_chunks_gives_the_loss_and_gradients_of_the_whole_logits(checkpointing):
    """The learner's own objective on a tiny Llama with a 5003-token vocabulary: one step's loss and
    every cost matrix's gradient, and the selection loss, with and without the chunked head."""
    model = _llama()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(2))
    config = PermuteConfig(init="identity", block_size=16, sequences_per_step=2, select_sequences=3)
    run = make_run(model, ids, config)
    hidden, kwargs = capture_layer_inputs(model, run.layers, run.input_ids)
    scores = {n: lin.weight.abs().float() for n, lin in run.linears.items()}
    _, dense = run.dense_pass(hidden, kwargs, [], keep_outputs=True)
    for site in run.sites:
        run.solve(site, scores)
    stack = layer_stack(run, kwargs)
    assert stack.token_head is not None
    stacks = {
        "chunks": dataclasses.replace(stack, token_head=TokenHead(stack.head, VOCAB, logits_per_chunk=5 * VOCAB)),
        "whole": dataclasses.replace(stack, token_head=None),
    }
    found = {}
    for name, chosen in stacks.items():
        run.rng.manual_seed(0)  # the same step sequences for both
        effective, objective = window_learning(
            run, chosen, range(len(run.layers)), hidden, dense, scores, None, checkpointing
        )
        with torch.no_grad():  # the cost matrices away from the identity, so that gradients differ by site
            for parameter in effective.permuters.parameters():
                parameter.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        loss = objective.loss(effective.soft(0.5), 0)
        loss.backward()
        grads = [p.grad.clone() for p in effective.permuters.parameters()]
        found[name] = (loss.detach(), grads, objective.select(effective.hard()))
    _close(found["chunks"][0], found["whole"][0])
    for chunks, whole in zip(found["chunks"][1], found["whole"][1], strict=True):
        _close(chunks, whole)
    assert found["chunks"][2] == pytest.approx(found["whole"][2], rel=1e-5)
