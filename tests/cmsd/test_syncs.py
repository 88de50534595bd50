"""Host syncs of the decode loop (cmsd.syncs), counted on CPU as a GPU would make them: reads of device data, ops
whose output size depends on the data, blocking copies between host and device. One per iteration is the goal: the
transfer that brings the verdict to the host, with the controller's next draft lengths and the caches' used slots.

What costs more, and why:
    head tree          the tree's size, read to cut the verify pass to it: + 1
    head tree, min_p   and before each deeper head pass, whether any path is still likely (head.tree_min_p > 0):
                       + 1 per pass after the first, at most depth - 1
The n-gram drafter matches on the host; it reads the verdict with the decoder's transfer and uploads its draft
asynchronously, so it needs nothing more. Per-document work (prefill, refill, rows leaving) is counted apart.
"""

from __future__ import annotations

import pytest
import torch

from cmsd import DecodeSettings, Decoder, HeadSettings, LoadedModel, ModelPair
from cmsd.drafters.head import FeatureHead
from cmsd.syncs import HostReads, SyncCounter, outside_loop, syncs_per_iteration, to_device
from tests.tiny import UNCAPPED, perturbed, random_prompts, repetitive_prompts, tiny_llama

NEW = 16
DEPTH = HeadSettings().depth
MOST = {  # case -> the most host syncs per decode-loop iteration
    "ar": 1,
    "ngram tree": 1,
    "model": 1,
    "head tree": 2,  # + the tree's size
    "head tree, min_p": 1 + 1 + (DEPTH - 1),  # + the tree's size, + whether to run each deeper pass
}


def _decoder(case: str, batch: int) -> Decoder:
    """A strict greedy decode whose verify budget is fixed (drafting never depends on a measurement)."""
    target = tiny_llama(seed=0)
    drafter = (None if case == "ar" else "ngram" if case == "ngram tree" else
               LoadedModel("drafter", perturbed(target, 0.004, 0), None) if case == "model" else
               FeatureHead(target, 1).eval())  # a head tree
    # an untrained head's q is low: every candidate (min_p 0), or the few that reach 0.01
    head = HeadSettings(tree_min_p=0.01 if case == "head tree, min_p" else 0.0)
    settings = DecodeSettings(method="ar" if case == "ar" else "cmasd", max_new_tokens=NEW, batch_size=batch,
                              verify_tokens=UNCAPPED, head=head)
    return Decoder(ModelPair(LoadedModel("target", target, None), drafter), settings)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("case", list(MOST))
def test_the_decode_loop_syncs_at_most_its_stated_number_per_iteration(case: str, batch: int) -> None:
    prompts = random_prompts(0, 5) + repetitive_prompts(0, 5)  # batch 8: finished rows are refilled
    decoder = _decoder(case, batch)
    with SyncCounter("cpu") as syncs:
        gens = decoder.generate_ids(prompts)
    assert decoder.iterations >= 10  # enough to count
    if case != "ar":
        assert decoder.tree == (case != "model") and sum(g.stats.drafted for g in gens) > 0
    assert syncs.count <= MOST[case] * decoder.iterations, (syncs.count, decoder.iterations)
    assert syncs.outside > 0  # the prefill's own, apart


def test_the_counter_counts_what_waits_for_a_gpu_and_nothing_else() -> None:
    made_before = torch.arange(6.0)  # device data: made before the counter (as a model's weights)
    with torch.inference_mode(), SyncCounter("cpu") as syncs:
        device = made_before * 2
        host = torch.tensor([1, 2, 3])  # Python data: host data by design
        assert host.tolist() == [1, 2, 3] and int(host.sum()) == 6 and syncs.count == 0
        assert device.sum().item() == 30 and syncs.count == 1  # .item() once (not again for its aten op)
        device[device > 4]  # a boolean mask: the output's size is the data's
        torch.tensor([1.0], device=device.device)  # a blocking copy onto the device
        assert syncs.count == 3 and syncs.uploads == 0
        to_device(torch.tensor([1.0]), device.device)  # from pinned memory, asynchronous: an upload
        assert syncs.count == 3 and syncs.uploads == 1
        reads = HostReads()
        counts, mean = reads.ask(device.long()), reads.ask(device.mean())
        assert counts.value == [0, 2, 4, 6, 8, 10] and mean.value == 5.0 and syncs.count == 4  # one transfer
        with outside_loop():
            device.tolist()
        assert syncs.count == 4 and syncs.outside == 1


def test_counting_leaves_the_output_as_it_is() -> None:
    prompts = random_prompts(1, 6)
    decoder = _decoder("ngram tree", 4)
    plain = [g.token_ids for g in decoder.generate_ids(prompts)]
    with SyncCounter("cpu"):
        assert [g.token_ids for g in decoder.generate_ids(prompts)] == plain
    assert syncs_per_iteration(decoder, prompts) <= MOST["ngram tree"]
