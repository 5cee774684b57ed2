"""margin_from_bn against the reference formula (scipy), and the margin-from-data estimator."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from ofdkern.margins import DataMarginEstimator, margin_from_bn


def reference_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The reference ``get_margin_from_BN``, scalar by scalar with math and scipy (float64), then float32."""
    margins = []
    for s, m in zip(gamma.tolist(), beta.tolist()):
        s = abs(s)
        if norm.cdf(-m / s) > 0.001:
            margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margins.append(-3 * s)
    return torch.tensor(margins, dtype=torch.float32)


def make_bn(gamma, beta, dtype=torch.float32, cls=nn.BatchNorm2d) -> nn.Module:
    gamma = torch.as_tensor(gamma, dtype=dtype)
    bn = cls(gamma.numel()).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(torch.as_tensor(beta, dtype=dtype))
    return bn


def random_bn_params(channels: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    gamma = torch.randn(channels, generator=generator) * 2
    beta = torch.randn(channels, generator=generator) * 3
    return gamma, beta


def negative_probability(gamma, beta):
    return torch.tensor(norm.cdf((-beta.double() / gamma.double().abs()).numpy()))


def test_matches_reference_bitwise_on_both_branches():
    gamma, beta = random_bn_params(4096, seed=0)
    probability = negative_probability(gamma, beta)
    # Both sides of the 0.001 threshold, and the cancellation-prone region just above it, are exercised.
    assert (probability > 0.001).sum() > 1000
    assert (probability <= 0.001).sum() > 500
    assert ((probability > 0.001) & (probability < 0.01)).sum() > 100
    margin = margin_from_bn(make_bn(gamma, beta))
    assert margin.dtype == torch.float32 and margin.shape == (4096,)
    assert torch.equal(margin, reference_margin(gamma, beta))


def test_threshold_branches_explicitly():
    # beta / |gamma| = 4: Phi(-4) = 3e-5 <= 0.001 -> -3 |gamma|.  beta = 0: E[x | x < 0] = -|gamma| sqrt(2/pi).
    gamma = torch.tensor([0.5, 2.0, 1.0, 1.0])
    beta = torch.tensor([2.0, 0.0, 3.0, -1.0])
    margin = margin_from_bn(make_bn(gamma, beta))
    assert margin[0] == -1.5
    assert margin[1] == pytest.approx(-2.0 * math.sqrt(2 / math.pi), rel=1e-7)
    # 3.0 sits just below the threshold edge (Phi(-3) = 0.00135 > 0.001): the conditional mean, not -3.
    assert margin[2] != -3.0 and -0.4 < margin[2] < 0
    assert torch.equal(margin, reference_margin(gamma, beta))
    assert (margin < 0).all()


def test_negative_gamma_uses_its_absolute_value():
    gamma, beta = random_bn_params(256, seed=1)
    positive = margin_from_bn(make_bn(gamma.abs(), beta))
    assert torch.equal(margin_from_bn(make_bn(-gamma.abs(), beta)), positive)
    assert torch.equal(margin_from_bn(make_bn(gamma, beta)), positive)


def test_zero_gamma_is_the_constant_feature():
    beta = torch.tensor([-1.5, 0.0, 2.0, -0.0])
    gamma = torch.tensor([0.0, 0.0, 0.0, -0.0])
    margin = margin_from_bn(make_bn(gamma, beta))
    assert torch.equal(margin, torch.tensor([-1.5, 0.0, 0.0, 0.0]))
    assert torch.isfinite(margin).all()


def test_nan_parameters_behave_like_the_reference():
    nan = float("nan")
    margin = margin_from_bn(make_bn([nan, 2.0, 0.0], [1.0, nan, nan]))
    # NaN gamma: NaN. NaN beta: Phi(NaN) > 0.001 is false, so -3 |gamma| as in the reference.
    assert margin[0].isnan() and margin[1] == -6.0 and margin[2].isnan()
    assert margin[1] == reference_margin(torch.tensor([2.0]), torch.tensor([nan]))[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_bn_parameters(dtype):
    gamma, beta = random_bn_params(512, seed=2)
    bn = make_bn(gamma, beta, dtype=dtype)
    margin = margin_from_bn(bn)
    assert margin.dtype == torch.float32
    # The reference reads the parameters with .item(): their exact values, evaluated in float64.
    assert torch.equal(margin, reference_margin(bn.weight.detach(), bn.bias.detach()))


def test_bn_without_affine_parameters_is_standard_normal():
    bn = nn.BatchNorm2d(5, affine=False)
    margin = margin_from_bn(bn)
    assert margin.shape == (5,) and margin.dtype == torch.float32
    assert torch.equal(margin, reference_margin(torch.ones(5), torch.zeros(5)))
    assert margin[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-7)


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_every_batchnorm_kind(cls):
    gamma, beta = random_bn_params(16, seed=3)
    assert torch.equal(margin_from_bn(make_bn(gamma, beta, cls=cls)), reference_margin(gamma, beta))


def test_result_is_detached_and_does_not_alias_the_parameters():
    bn = make_bn(*random_bn_params(8, seed=4))
    assert bn.weight.requires_grad
    margin = margin_from_bn(bn)
    assert not margin.requires_grad and margin.grad_fn is None
    before = margin.clone()
    with torch.no_grad():
        bn.bias.add_(1.0)
    assert torch.equal(margin, before)


def test_rejects_what_is_not_a_batchnorm():
    with pytest.raises(TypeError, match="bn must be a torch.nn BatchNorm"):
        margin_from_bn(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="lazy BatchNorm"):
        margin_from_bn(nn.LazyBatchNorm2d())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bn_gives_the_cpu_margin_on_its_device():
    gamma, beta = random_bn_params(1024, seed=5)
    bn = make_bn(gamma, beta)
    cpu_margin = margin_from_bn(bn)
    cuda_margin = margin_from_bn(bn.cuda())
    assert cuda_margin.device.type == "cuda"
    # At most 1 float32 ulp: CUDA's float64 exp/erf/erfc may differ from the CPU's in the last bits.
    torch.testing.assert_close(cuda_margin.cpu(), cpu_margin, rtol=1.2e-7, atol=0)


# --- margin from data -------------------------------------------------------------------------------------

def dyadic_features(shape, seed, dtype=torch.float32):
    """Values on a 1/64 grid: every float64 sum of them is exact, whatever the order."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 64).round().div(64).to(dtype)


def direct_margin(features: torch.Tensor) -> torch.Tensor:
    """Mean of the negative values of each channel (dim 1) over everything, 0 for none, float32."""
    per_channel = features.double().transpose(0, 1).reshape(features.shape[1], -1)
    means = [row[row < 0].mean() if (row < 0).any() else torch.tensor(0.0, dtype=torch.float64)
             for row in per_channel]
    return torch.stack(means).float()


def test_estimator_matches_direct_computation_over_concatenated_batches():
    batches = [dyadic_features((n, 6, 5, 4), seed=n) for n in (3, 1, 4)]
    for batch in batches:
        batch[:, 2] = batch[:, 2].abs()  # a channel that is never negative
    estimator = DataMarginEstimator(6)
    for batch in batches:
        estimator.update(batch)
    margin = estimator.margin
    assert margin.dtype == torch.float32 and margin.shape == (6,)
    assert torch.equal(margin, direct_margin(torch.cat(batches)))
    assert margin[2] == 0
    assert (margin <= 0).all() and (margin[[0, 1, 3, 4, 5]] < 0).all()
    assert torch.equal(estimator.negative_count, (torch.cat(batches) < 0).sum(dim=(0, 2, 3)))


def test_estimator_with_no_data_is_zero():
    assert torch.equal(DataMarginEstimator(3).margin, torch.zeros(3))


@pytest.mark.parametrize("shape,layout", [
    ((4, 5, 3, 6), torch.channels_last),
    ((2, 5, 3, 4, 2), torch.channels_last_3d),
])
def test_channels_last_equals_contiguous(shape, layout):
    features = dyadic_features(shape, seed=7)
    contiguous, channels_last = DataMarginEstimator(5), DataMarginEstimator(5)
    contiguous.update(features)
    channels_last.update(features.to(memory_format=layout))
    assert torch.equal(channels_last.negative_sum, contiguous.negative_sum)
    assert torch.equal(channels_last.negative_count, contiguous.negative_count)
    assert torch.equal(channels_last.margin, direct_margin(features))


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 9)])
def test_two_and_three_dim_features(shape):
    features = dyadic_features(shape, seed=8)
    estimator = DataMarginEstimator(5)
    estimator.update(features)
    assert torch.equal(estimator.margin, direct_margin(features))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_accumulates_in_float64(dtype):
    features = dyadic_features((3, 4, 5, 5), seed=9, dtype=dtype)
    estimator = DataMarginEstimator(4)
    estimator.update(features)
    assert estimator.negative_sum.dtype == torch.float64
    assert torch.equal(estimator.margin, direct_margin(features))


def test_state_dict_round_trip_resumes_the_running_mean():
    first, second = dyadic_features((2, 3, 4, 4), seed=10), dyadic_features((5, 3, 4, 4), seed=11)
    uninterrupted = DataMarginEstimator(3)
    uninterrupted.update(first)
    uninterrupted.update(second)

    saved = DataMarginEstimator(3)
    saved.update(first)
    state = saved.state_dict()
    assert set(state) == {"negative_sum", "negative_count"}
    resumed = DataMarginEstimator(3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.margin, saved.margin)
    resumed.update(second)
    assert torch.equal(resumed.margin, uninterrupted.margin)


def test_update_builds_no_graph_and_reset_forgets():
    features = dyadic_features((2, 3, 4, 4), seed=12).requires_grad_()
    estimator = DataMarginEstimator(3)
    estimator.update(features)
    assert not estimator.negative_sum.requires_grad and estimator.margin.grad_fn is None
    assert (estimator.margin < 0).all()
    estimator.reset()
    assert torch.equal(estimator.margin, torch.zeros(3))
    assert estimator.negative_count.sum() == 0


def test_nan_poisons_only_its_channel():
    features = dyadic_features((2, 3, 4, 4), seed=13)
    features[0, 1, 0, 0] = float("nan")
    estimator = DataMarginEstimator(3)
    estimator.update(features)
    margin = estimator.margin
    assert margin[1].isnan()
    assert torch.equal(margin[[0, 2]], direct_margin(features[:, [0, 2]]))


def test_estimator_rejects_bad_input():
    estimator = DataMarginEstimator(3)
    with pytest.raises(ValueError, match="3 channels on dim 1"):
        estimator.update(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="2 to 5 dims"):
        estimator.update(torch.zeros(3))
    with pytest.raises(TypeError, match="teacher_features must be float"):
        estimator.update(torch.zeros(2, 3, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        DataMarginEstimator(0)
    with pytest.raises(TypeError, match="num_channels must be a positive int, got bool True"):
        DataMarginEstimator(True)
    with pytest.raises(TypeError, match="num_channels must be a positive int, got float 3.0"):
        DataMarginEstimator(3.0)
    assert DataMarginEstimator(np.int64(2)).num_channels == 2
    assert "num_channels=3" in repr(estimator)
