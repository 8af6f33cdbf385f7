import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gear.eval.codebook import CodebookCounter, codebook_stats


def test_all_codes_used_equally():
    s = codebook_stats(torch.arange(16).repeat(3).view(3, 4, 4), 16)
    assert s.usage == 1.0 and s.used_codes == 16
    assert s.perplexity == pytest.approx(16.0)
    assert s.entropy == pytest.approx(math.log(16))


def test_one_code():
    s = codebook_stats(torch.full((2, 4, 4), 5), 8)
    assert s.used_codes == 1 and s.usage == 1 / 8
    assert s.perplexity == pytest.approx(1.0) and s.entropy == pytest.approx(0.0)


def test_uneven_use_hand_entropy():
    s = codebook_stats(torch.tensor([0, 0, 0, 3]), 4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s.entropy == pytest.approx(h) and s.perplexity == pytest.approx(math.exp(h))
    assert s.usage == 0.5


def test_counter_accumulates_batches():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 10, (3, 2, 2), generator=g) for _ in range(4)]
    counter = CodebookCounter(10)
    for b in batches:
        counter.update(b)
    assert counter.compute() == codebook_stats(torch.cat(batches), 10)
    assert counter.compute() == counter.compute()  # computing leaves the counts as they are
    counter.reset()
    with pytest.raises(ValueError, match="no indices"):
        counter.compute()


def test_bad_indices_raise():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_stats(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="integer"):
        codebook_stats(torch.tensor([0.0, 1.0]), 4)


def _rank_main(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    counter = CodebookCounter(6)
    counter.update(torch.tensor([0, 1]) if rank == 0 else torch.tensor([2, 2, 3]))
    torch.save(counter.compute(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_counter_sums_over_processes(tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    expected = codebook_stats(torch.tensor([0, 1, 2, 2, 3]), 6)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}", weights_only=False) == expected
