import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

from gear.models.autoencoder import TokenizerConfig
from gear.models.quantizers import (
    QUANTIZERS,
    IndexBackpropQuantizer,
    LookupFreeQuantizer,
    VectorQuantizer,
    bits_to_indices,
    build_quantizer,
    entropy_loss,
    global_mean,
    indices_to_bits,
)
from gear.models.soft import soft_assignment




FAMILIES = {
    "vq": lambda: VectorQuantizer(512, 8),
    "lfq": lambda: LookupFreeQuantizer(9),
    "ibq": lambda: IndexBackpropQuantizer(512, 32),
}


def make(family: str, seed: int = 0):
    torch.manual_seed(seed)
    q = FAMILIES[family]()
    z = torch.randn(2, q.code_dim, 4, 4, requires_grad=True)
    return q, z


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes_and_types(family):
    q, z = make(family)
    out = q(z)
    assert out.z_q.shape == z.shape
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.long
    assert out.d.shape == (2 * 4 * 4, q.codebook_size)
    assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size
    for loss in (out.losses.codebook, out.losses.commitment, out.losses.entropy, out.losses.total):
        assert loss.ndim == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_assignment_argmax_is_the_hard_index(family):
    q, z = make(family)
    out = q(z)
    soft = soft_assignment(out.d, 1.0)
    assert torch.allclose(soft.sum(-1), torch.ones(soft.shape[0]))
    assert torch.equal(soft.argmax(-1), out.indices.flatten())


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_assignment_tends_to_one_hot_as_temperature_goes_to_zero(family):
    q, z = make(family)
    out = q(z)
    one_hot = F.one_hot(out.indices.flatten(), q.codebook_size).float()
    gaps = [(soft_assignment(out.d, t) - one_hot).abs().max().item() for t in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)]
    assert all(a >= b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-3, gaps  # (a near tie between two codes can need T below 1e-4)
    # and at a high temperature it is far from one-hot (so the check above is not vacuous)
    assert (soft_assignment(out.d, 10.0) - one_hot).abs().max() > 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_indices_reproduces_z_q(family):
    q, z = make(family)
    out = q(z)
    assert torch.allclose(q.decode_indices(out.indices), out.z_q, atol=1e-5)


@pytest.mark.parametrize("family", ["vq", "ibq"])
def test_d_is_differentiable_wrt_z_and_codebook(family):
    q, z = make(family)
    out = q(z)
    weights = torch.randn_like(out.d)
    (soft_assignment(out.d, 0.1) * weights).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad.abs().sum() > 0


def test_lfq_d_is_differentiable_wrt_z():
    q, z = make("lfq")
    out = q(z)
    (soft_assignment(out.d, 0.1) * torch.randn_like(out.d)).sum().backward()
    assert z.grad.abs().sum() > 0


def test_vq_is_nearest_cosine_code_with_d_equal_to_2_minus_2cos():
    q, z = make("vq")
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    cos = F.normalize(flat, dim=-1) @ F.normalize(q.embedding.weight.detach(), dim=-1).t()
    assert torch.allclose(out.d, 2 - 2 * cos, atol=1e-5)
    assert torch.equal(out.indices.flatten(), cos.argmax(-1))
    assert torch.allclose(q.embedding.weight.norm(dim=-1), torch.ones(512), atol=1e-5)  # unit-norm init


def test_vq_losses_and_straight_through():
    q, z = make("vq")
    q.entropy_ratio = 0.0
    out = q(z)
    z_n = F.normalize(z.detach(), dim=1)
    mse = F.mse_loss(q.decode_indices(out.indices), z_n)
    assert torch.allclose(out.losses.codebook, mse)
    assert torch.allclose(out.losses.commitment, 0.25 * mse)
    # codebook loss moves only the codebook, commitment only the encoder side
    out.losses.codebook.backward(retain_graph=True)
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0
    out.losses.commitment.backward(retain_graph=True)
    assert z.grad.abs().sum() > 0
    # straight-through: the gradient of z_q wrt z is that of normalize(z)
    z.grad = None
    g = torch.randn_like(out.z_q)
    (out.z_q * g).sum().backward()
    expected, = torch.autograd.grad((F.normalize(z, dim=1) * g).sum(), z)
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_vq_keeps_the_checkpoint_buffer_and_forward_changes_no_state():
    q, z = make("vq")
    assert "codebook_used" in q.state_dict() and q.codebook_used.shape == (65536,)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_lfq_quantizes_to_signs_with_bit_indices():
    q, z = make("lfq")
    out = q(z)
    assert torch.equal(out.z_q, torch.where(z > 0, 1.0, -1.0))
    bits = (z.detach() > 0).permute(0, 2, 3, 1)
    assert torch.equal(out.indices, bits_to_indices(bits))
    assert torch.allclose(out.losses.commitment, 0.25 * F.mse_loss(z.detach(), out.z_q.detach()))
    assert out.losses.codebook == 0
    assert "codes" not in q.state_dict() and len(list(q.parameters())) == 0
    g = torch.randn_like(out.z_q)
    (out.z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # identity straight-through


@pytest.mark.parametrize("dim", [9, 14])
def test_lfq_index_bits_bijection(dim):
    codes = torch.arange(2**dim)
    bits = indices_to_bits(codes, dim)
    assert bits.shape == (2**dim, dim) and bits.dtype == torch.bool
    assert torch.equal(bits_to_indices(bits), codes)
    assert torch.unique(bits, dim=0).shape[0] == 2**dim
    random_bits = torch.rand(100, dim) > 0.5
    assert torch.equal(indices_to_bits(bits_to_indices(random_bits), dim), random_bits)
    assert torch.equal(indices_to_bits(torch.tensor(1), dim)[0], torch.tensor(True))  # least significant first


def test_lfq_d_is_minus_two_inner_products_with_all_codes():
    q, z = make("lfq")
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 9)
    codes = indices_to_bits(torch.arange(512), 9).float() * 2 - 1
    assert torch.allclose(out.d, -2 * flat @ codes.t(), atol=1e-5)


def test_ibq_forward_value_is_hard_and_gradient_is_soft():
    q, z = make("ibq")
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 32)
    logits = flat @ q.embedding.weight.detach().t()
    assert torch.allclose(out.d, -logits, atol=1e-4)
    hard = q.embedding.weight[out.indices].permute(0, 3, 1, 2)
    assert torch.equal(out.z_q, hard)
    # every code gets gradient through the soft assignment, not only the selected ones
    out.z_q.pow(2).sum().backward()
    assert (q.embedding.weight.grad.abs().sum(-1) > 0).all()
    assert z.grad.abs().sum() > 0


def test_ibq_losses_follow_the_paper():
    q, z = make("ibq")
    out = q(z)
    mse = F.mse_loss(q.decode_indices(out.indices), z.detach())
    assert torch.allclose(out.losses.commitment, mse)
    assert torch.allclose(out.losses.codebook, (1 + 0.25) * mse)


@pytest.mark.parametrize("family", FAMILIES)
def test_entropy_loss_matches_its_definition(family):
    q, z = make(family)
    out = q(z)
    probs = torch.softmax(-out.d.detach() / 0.01, -1)
    sample = Categorical(probs=probs).entropy().mean()
    batch = Categorical(probs=probs.mean(0)).entropy()
    assert torch.allclose(out.losses.entropy, 0.05 * (sample - batch), atol=1e-3)
    out.losses.entropy.backward()
    assert z.grad.abs().sum() > 0


def test_entropy_loss_prefers_confident_and_diverse_assignments():
    diverse = torch.full((8, 8), 5.0) - 5.0 * torch.eye(8)  # token i sits on code i
    collapsed = torch.full((8, 8), 5.0)
    collapsed[:, 0] = 0.0  # every token on code 0
    assert entropy_loss(diverse, 0.1, 1.0) < entropy_loss(collapsed, 0.1, 1.0) - 1.0


def test_zero_entropy_ratio_skips_the_computation():
    torch.manual_seed(0)
    q = VectorQuantizer(512, 8, entropy_ratio=0.0)
    out = q(torch.randn(2, 8, 4, 4, requires_grad=True))
    assert out.losses.entropy == 0 and out.losses.entropy.grad_fn is None


def test_global_mean_without_distributed_is_the_mean():
    x = torch.randn(5, 3)
    assert torch.allclose(global_mean(x), x.mean(0))
    assert torch.allclose(global_mean(x, dim=1), x.mean(1))


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.full((4, 3), float(rank + 1), requires_grad=True)
    mean = global_mean(x)
    (mean * (rank + 1)).sum().backward()  # rank-dependent upstream gradients: the backward must sum them
    torch.save({"mean": mean.detach(), "grad": x.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_global_mean_averages_across_ranks_with_gradients():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(
            _distributed_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True
        )
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    for r in results:
        assert torch.allclose(r["mean"], torch.full((3,), 1.5))  # mean of rank values 1 and 2
        # all ranks' upstream gradients (1 and 2) are summed, then / world, then / n_local per element
        assert torch.allclose(r["grad"], torch.full((4, 3), (1 + 2) / 2 / 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizer_math_stays_float32_under_autocast(family):
    q, z = make(family)
    expected = q(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.d.dtype == torch.float32 and torch.equal(out.indices, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_raise_clear_errors(family):
    q, _ = make(family)
    c = q.code_dim
    with pytest.raises(ValueError, match=rf"\(B, {c}, h, w\)"):
        q(torch.randn(2, c + 1, 4, 4))
    with pytest.raises(ValueError, match=rf"\(B, {c}, h, w\)"):
        q(torch.randn(2, c, 16))
    with pytest.raises(ValueError, match=rf"\(B, {c}, h, w\)"):
        q(torch.zeros(2, c, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        q.decode_indices(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        q.decode_indices(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        q.decode_indices(torch.full((1, 2, 2), 512, dtype=torch.long))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="2 \\*\\* code_dim"):
        build_quantizer("lfq", 500, 9)
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("fsq", 512, 8)
    assert isinstance(build_quantizer("lfq", 512, 9), LookupFreeQuantizer)


def test_each_family_checks_its_own_settings_for_the_config_too():
    assert {name: cls.__name__ for name, cls in QUANTIZERS.items()} == {
        "vq": "VectorQuantizer", "lfq": "LookupFreeQuantizer", "ibq": "IndexBackpropQuantizer"}
    QUANTIZERS["vq"].check_settings(500, 9, 0.25, 0.05, 0.01)  # any codebook size
    with pytest.raises(ValueError, match="2 \\*\\* code_dim"):
        QUANTIZERS["lfq"].check_settings(500, 9, 0.25, 0.05, 0.01)
    with pytest.raises(ValueError, match="entropy_temperature"):
        QUANTIZERS["ibq"].check_settings(512, 8, 0.25, 0.05, 0.0)
    # The tokenizer config asks the family: LFQ's limit on code_dim fails there, before any model is built.
    with pytest.raises(ValueError, match=r"\[1, 20\]"):
        TokenizerConfig(quantizer="lfq", backbone="magvit2", codebook_size=2**21, codebook_dim=21, z_channels=21)
    TokenizerConfig(quantizer="vq", codebook_size=500, codebook_dim=9)
