"""Distilling a drafter from its target (cmsd.train.distill): the KL to the target falls, the reduced draft vocabulary
drafts only its ids, and the saved directory loads as a drafter whose strict output is the target's greedy output."""

from __future__ import annotations

import torch

from cmsd import DecodeSettings, Decoder, load_pair
from cmsd.drafters.model import DraftVocabHead, use_draft_vocab
from cmsd.train.data import TeacherData, draft_vocabulary, teacher_targets
from cmsd.train.distill import evaluate, init_drafter, save_drafter, student_logits, train
from cmsd.train.loop import DistillSettings
from tests.raytest import tiny_target  # noqa: F401  (fixture)
from tests.tiny import TINY_VOCAB, UNCAPPED, random_prompts, tiny_llama


def _data(target, seed: int, count: int) -> TeacherData:
    seqs = random_prompts(seed, count, low=10, high=40)
    return teacher_targets(target, seqs, [len(s) // 2 for s in seqs], top_k=TINY_VOCAB, batch_tokens=256)


def test_distillation_lowers_the_kl_to_the_target(tmp_path) -> None:
    target = tiny_llama(seed=0, layers=4)
    train_data, held = _data(target, 1, 48), _data(target, 2, 8)
    vocab = draft_vocabulary(train_data, 0, TINY_VOCAB)
    assert torch.equal(vocab, torch.arange(TINY_VOCAB))
    student = init_drafter(target, 2)
    assert len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, target.model.layers[3].mlp.up_proj.weight)
    before = evaluate(student, vocab, held)
    state = train(student, train_data, vocab, DistillSettings(layers=2, steps=60, batch_tokens=256, lr=3e-3),
                  checkpoint=tmp_path / "ckpt.pt", checkpoint_every=20)
    after = evaluate(student, vocab, held)
    assert state.step == 60 and (tmp_path / "ckpt.pt").is_file()
    assert after.kl < 0.7 * before.kl, (before, after)
    assert after.agreement_all > before.agreement_all
    assert sum(state.losses[-10:]) < sum(state.losses[:10])
    assert not student.model.embed_tokens.weight.requires_grad  # the embedding (= the head) stays the target's


def test_training_resumes_from_its_checkpoint(tmp_path) -> None:
    target = tiny_llama(seed=0, layers=3)
    data = _data(target, 1, 16)
    vocab = draft_vocabulary(data, 0, TINY_VOCAB)
    settings = DistillSettings(layers=2, steps=10, batch_tokens=256)
    student = init_drafter(target, 2)
    first = train(student, data, vocab, DistillSettings(**{**settings.__dict__, "steps": 4}),
                  checkpoint=tmp_path / "ckpt.pt", checkpoint_every=2)
    resumed = init_drafter(target, 2)
    state = train(resumed, data, vocab, settings, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=2)
    assert first.step == 4 and state.step == 10 and len(state.losses) == 10
    assert state.losses[:4] == first.losses


def test_reduced_draft_vocabulary() -> None:
    target = tiny_llama(seed=0, layers=2)
    data = _data(target, 3, 16)
    vocab = draft_vocabulary(data, 8, TINY_VOCAB, always={5})
    top1 = torch.bincount(torch.cat([t[:, 0].long() for t in data.top_ids]), minlength=TINY_VOCAB)
    assert 5 in vocab.tolist() and len(vocab) == 8
    assert int(top1.argmax()) in vocab.tolist()  # the target's most frequent prediction is draftable
    head = DraftVocabHead(target.model.embed_tokens.weight, vocab)
    hidden = torch.randn(2, 3, target.config.hidden_size)
    logits = head(hidden)
    assert logits.shape == (2, 3, TINY_VOCAB)
    assert torch.allclose(logits[..., vocab], hidden @ target.model.embed_tokens.weight[vocab].T)
    outside = torch.ones(TINY_VOCAB, dtype=torch.bool)
    outside[vocab] = False
    assert bool((logits[..., outside] <= -1e4).all())
    student = init_drafter(target, 1)
    ids = torch.tensor([data.seqs[0].tolist()])
    sub = student_logits(student, ids, torch.ones_like(ids), vocab)
    student.lm_head = DraftVocabHead(student.model.embed_tokens.weight, vocab)
    assert torch.allclose(student(input_ids=ids).logits[..., vocab], sub, atol=1e-5)


def test_a_saved_drafter_loads_as_a_drafter_and_strict_output_is_greedy(tmp_path, tiny_target) -> None:
    """On a tiny target with the real tokenizer: save, load through load_pair, decode strictly."""
    pair = load_pair(str(tiny_target), None, device="cpu", dtype="float32")
    target = pair.target.model
    seqs = [[1] + list(range(100 + i, 140 + i)) * 2 for i in range(6)]
    data = teacher_targets(target, seqs, [40] * 6, top_k=16)
    vocab = draft_vocabulary(data, 256, target.config.vocab_size, always={2})
    student = init_drafter(target, 1)
    train(student, data, vocab, DistillSettings(layers=1, steps=5, batch_tokens=512))
    out = tmp_path / "drafter"
    save_drafter(student, pair.tokenizer, vocab, out, "# card\n", {"target": str(tiny_target)})
    loaded = load_pair(str(tiny_target), str(out), device="cpu", dtype="float32")
    assert isinstance(loaded.drafter.model.lm_head, DraftVocabHead)
    assert not use_draft_vocab(loaded.target.model, tiny_target)  # a plain directory keeps its head
    prompts = [s[:30] for s in seqs[:4]]
    greedy = [g.token_ids for g in Decoder(pair, DecodeSettings(method="ar", max_new_tokens=12)).generate_ids(prompts)]
    for batch in (1, 3):
        settings = DecodeSettings(verify_tokens=UNCAPPED, method="cmasd", verify="strict", max_new_tokens=12, batch_size=batch)
        gens = Decoder(loaded, settings).generate_ids(prompts)
        assert [g.token_ids for g in gens] == greedy
        assert sum(g.stats.drafted for g in gens) > 0
